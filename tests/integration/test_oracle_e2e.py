"""The user's CI as the execution oracle, end to end through the real parts: a vendored project
(``tests/data/oracle_project``) in a git checkout, a completion asked for as the VS Code
extension asks (its window, ``context.repository``, ``file_path``) from the live server on the
tiny model, accepted and edited by the "developer", its ledger entry pushed; then the project's
own pytest with pytest-kaizen and ``--kaizen-explore``: the server samples alternatives from the
recorded context (``POST /v1/resample``), the plugin splices each in, re-runs the attributed
test, reports the sealed verdicts; a round pairs them (``ci_resample``) and trains on them. The
working tree is byte for byte what it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import select

from server.store.db import make_engine, make_session_factory
from server.store.models import Completion, CompletionOutcome
from tests.integration.conftest import LiveServer, TinyWorld
from trainer.config import TrainConfig
from trainer.round import RoundOptions, run_round

pytestmark = pytest.mark.engine

PROJECT = Path(__file__).resolve().parents[1] / "data" / "oracle_project"
REPOSITORY = "github.com/acme/tinycalc"
FILE = "tinycalc/ops.py"
BODY = "    return a + b\n"
KEPT = "a + b"  # what the developer made of the model's text


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if path.is_file() and parts[0] != ".git" and "spool" not in parts:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out["/".join(parts)] = f"{digest}:{stat.st_mode:o}:{stat.st_mtime_ns}"
    return out


def _window(text: str, cursor: int) -> tuple[str, str]:
    """The extension's window (plugins/vscode/src/request.ts): 3,000 characters before the
    cursor and 1,000 after (the whole of a file this small)."""
    return text[max(0, cursor - 3000) : cursor], text[cursor : cursor + 1000]


def test_ci_explores_and_the_round_trains_on_ci_resample_pairs(
    tiny_server: LiveServer, tiny_world: TinyWorld, tmp_path: Path
) -> None:
    root = tmp_path / "tinycalc"
    shutil.copytree(PROJECT, root)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "remote", "add", "origin", "https://github.com/Acme/tinycalc.git")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "start")

    # -- the editor: a completion at the cursor in add()'s body, accepted, then edited
    source = (root / FILE).read_text()
    cursor = source.index(BODY) + len("    return ")
    prefix, suffix = _window(source, cursor)
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        headers=tiny_server.headers["ide"],
        json={
            "model": "tiny",
            "prompt": prefix,
            "suffix": suffix,
            # Room for a random line to reach its end: an alternative cut off by max_tokens is
            # never judged (nor trained as complete), and the alternatives repeat this limit.
            "max_tokens": 200,
            "temperature": 0,
            "single_line": True,
            "context": {"language": "python", "file_path": FILE, "repository": REPOSITORY},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    served_id, served_text = r.json()["id"], r.json()["choices"][0]["text"]
    now = datetime.now(UTC).isoformat()
    r = httpx.put(
        f"{tiny_server.url}/v1/ledger",
        headers=tiny_server.headers["ide"],
        json={
            "entries": [
                {
                    "completion_id": served_id,
                    "repository": REPOSITORY,
                    "file_path": FILE,
                    "inserted_text": served_text,
                    "current_text": KEPT,
                    "start_offset": cursor,
                    "updated_at": now,
                }
            ]
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["stored"] == 1, r.text
    # The file as the developer left it: the tree CI checks out (``a + b`` kept).
    assert source[cursor : cursor + len(KEPT)] == KEPT
    before = _snapshot(root)

    # -- CI: the project's tests with pytest-kaizen, exploring
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAIZEN_", "PYTEST_ADDOPTS"))}
    env.update(
        {
            "KAIZEN_URL": tiny_server.url,
            "KAIZEN_TOKEN": tiny_server.secret("ci"),
            "KAIZEN_RUN_ID": "e2e:oracle:1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--kaizen-explore",
            "1",
            "--kaizen-explore-k",
            "8",
            "--kaizen-explore-budget",
            "150",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    print(output)  # the plugin's summary lines (-s shows them): what exploration cost
    assert run.returncode == 0, output  # the build's result: its tests passed
    assert "kaizen: reported run e2e:oracle:1: 1 completion (1 passed)" in output
    assert "kaizen: explored 1 completion(s)" in output, output
    assert "kaizen: reported run e2e:oracle:1:explore" in output, output
    assert _snapshot(root) == before
    assert _git(root, "status", "--porcelain") == ""

    # -- the server: alternatives recorded with their parent, sealed verdicts as outcomes
    db = make_engine(tiny_server.settings.database_url)
    factory = make_session_factory(db)
    with factory() as session:
        children = session.scalars(select(Completion).where(Completion.parent_id == served_id))
        [child] = list(children)
        assert child.source == "resample" and child.repository == REPOSITORY
        assert (child.prompt, child.suffix) == (prefix, suffix)
        assert child.params["single_line"] is True and child.params["n"] == 8
        outcomes = session.scalars(
            select(CompletionOutcome).where(CompletionOutcome.completion_id == child.id)
        ).all()
        verdicts = {o.choice_index: (o.status, list(o.tests or [])) for o in outcomes}
    texts = {c.index: c.text for c in child.choices}
    assert verdicts, f"no alternative got a sealed verdict: {output}"
    for index, (status, tests) in verdicts.items():
        # The tiny random model's lines never make add() pass: each broke the import
        # (build_failed, no tests) or failed the test that ran add()'s line.
        assert status in ("failed", "build_failed"), (texts[index], status)
        assert tests == ([] if status == "build_failed" else ["tests/test_ops.py::test_add"])

    # -- a round: the served (kept) text against the alternatives, trained on
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_round(
            session_factory=factory,
            base_model_dir=tiny_world.model_dir,
            rounds_dir=tmp_path / "rounds",
            config=TrainConfig(
                batch_size=2,
                max_steps=2,
                warmup_steps=0,
                learning_rate=2e-2,
                lora_r=8,
                lora_alpha=16,
                max_length=512,
                gradient_checkpointing=False,
            ),
            options=RoundOptions(n_resample=0, select=False, min_pairs=1),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
        db.dispose()
    assert report.status == "succeeded", report.error
    pairs = report.funnel["pairs"]
    assert pairs["pairs_by_source"]["ci_resample"] >= 1, pairs
    assert pairs["pairs_by_source"]["ci_resample"] == pairs["pairs"]
    assert pairs["records_ci_resample"] == len(verdicts)
    assert report.funnel["trained_pairs"] == pairs["pairs"]
