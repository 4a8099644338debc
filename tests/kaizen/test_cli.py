"""The composition root: one ``kaizen`` command with both halves' subcommands."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from kaizen.cli import app


def test_the_kaizen_command_has_the_server_and_the_trainer_subcommands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "model", "tokens", "adapters", "rollout", "repos", "db"):
        assert command in result.output  # server/cli.py
    for command in ("train", "gate", "rounds"):
        assert command in result.output  # trainer/cli.py


def test_python_dash_m_kaizen_is_the_same_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kaizen", "tokens", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "create" in out.stdout and "revoke" in out.stdout
