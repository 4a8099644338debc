"""Fixtures for the CI clients' tests: a fake Kaizen server, a clean environment, and temporary
projects in which pytest (with pytest-kaizen) or kaizen-report runs in a subprocess.

The projects run in subprocesses rather than through ``pytester``: the plugin installs a
tracer and imports the project's modules, which must not leak into this session, and
``pytest_plugins = ["pytester"]`` is refused in a conftest below the top level once the whole
suite runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.fake_kaizen import FakeKaizen, running

# Variables that would change what the clients detect or where they report.
_CLEARED_PREFIXES = ("KAIZEN_", "GITHUB_", "CI_", "GITLAB_", "COV_CORE_")
_CLEARED = {
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "BUILD_TAG",
    "BRANCH_NAME",
    "CHANGE_BRANCH",
    "GIT_BRANCH",
    "GIT_COMMIT",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CI, proxy or Kaizen settings from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kaizen_server() -> Iterator[FakeKaizen]:
    """A fake Kaizen server on 127.0.0.1 (see ``fake_kaizen``)."""
    with running() as state:
        yield state


# Plugins the projects do not need: leaving them out halves each subprocess's start-up.
QUIET_PLUGINS = ["-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:anyio", "-p", "no:timeout"]


@dataclass
class Run:
    """A finished subprocess."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together."""
        return self.stdout + self.stderr


CALC = """\
def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b
"""


class Project:
    """A temporary project: ``src/calc.py`` and tests, optionally a ledger and a git repo."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.write("pytest.ini", "[pytest]\npythonpath = src\n")
        self.write("src/calc.py", CALC)

    def write(self, relative: str, text: str) -> Path:
        """Write a file (dedented)."""
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text), encoding="utf-8")
        return target

    def write_ledger(self, *entries: Mapping[str, Any]) -> None:
        """Write ``.kaizen/ledger.jsonl`` with these entries."""
        lines = "".join(json.dumps(dict(entry)) + "\n" for entry in entries)
        self.write(".kaizen/ledger.jsonl", lines)

    def git_init(self, remote: str) -> str:
        """Make it a git repository with one commit and ``origin``; returns the commit."""

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                cwd=self.path,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()

        git("init", "-q", "-b", "main")
        git("remote", "add", "origin", remote)
        git("add", "-A")
        git("commit", "-q", "-m", "start")
        return git("rev-parse", "HEAD")

    def spooled(self) -> list[Path]:
        """Reports waiting in the default spool."""
        return sorted((self.path / ".kaizen" / "spool").glob("*.json"))

    def _run(self, command: list[str], env: Mapping[str, str] | None, timeout: float) -> Run:
        full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        result = subprocess.run(
            command,
            cwd=self.path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Run(result.returncode, result.stdout, result.stderr)

    def pytest(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        """Run pytest here in a subprocess (plugins load from their entry points)."""
        command = [sys.executable, "-m", "pytest", *QUIET_PLUGINS, "-rA", *args]
        return self._run(command, env, timeout=60)

    def kaizen_report(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        """Run ``kaizen-report ARGS`` here in a subprocess."""
        command = [sys.executable, "-m", "kaizen_client.wrapper", *args]
        return self._run(command, env, timeout=60)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A fresh temporary project (see :class:`Project`)."""
    return Project(tmp_path / "calc-project")
