"""The ``kaizen`` command. Each half of the product owns its subcommands; this module only puts
them under one name:

* :mod:`server.cli`: ``serve``, ``model``, ``tokens``, ``adapters``, ``rollout``, ``repos``,
  ``db``;
* :mod:`trainer.cli`: ``train``, ``gate``, ``rounds``.
"""

from __future__ import annotations

import typer

from server import cli as server_cli
from trainer import cli as trainer_cli

app = typer.Typer(
    help="Kaizen: an on-prem code assistant that learns from its users' tests.",
    no_args_is_help=True,
    add_completion=False,
)
server_cli.register(app)
trainer_cli.register(app)

if __name__ == "__main__":
    app()
