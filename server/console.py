"""What every ``kaizen`` subcommand shares: logging to stderr in the server's format, a red
error line and exit status 1, and printing a nested dict (a round's funnel) as indented lines."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import typer

from server.config import unknown_settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def warn_unknown_settings() -> None:
    """Log each ``KAIZEN_*`` variable of the environment that is no setting (see
    :func:`server.config.unknown_settings`)."""
    for warning in unknown_settings(os.environ):
        logging.getLogger("kaizen.config").warning("event=unknown_setting %s", warning)


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def echo_tree(tree: Mapping[str, Any], indent: str = "  ") -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            typer.echo(f"{indent}{key}:")
            echo_tree(value, indent + "  ")
        else:
            typer.echo(f"{indent}{key}: {value}")
