"""From the editor to CI through the real server: a completion is asked for, shown, accepted and
written into a project; the project's tests run under the Kaizen pytest plugin; the server ends
up with the completion's events and outcomes, including a failure the developer later fixed.

The engine is scripted (the completion texts must be real code for the tests to mean anything);
the server, the database, the plugin and pytest are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from server.app import create_app
from server.config import Settings
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server

REPO = "github.com/acme/calc"
CALC_PREFIX = "def add(a, b):\n    "
MUL_PREFIX = "def mul(a, b):\n    "
TESTS = """from calc import add, mul


def test_add():
    assert add(2, 3) == 5


def test_mul():
    assert mul(2, 3) == 6
"""


def _reply(prompt: str, adapter: str | None, index: int) -> str:
    # The "model" always writes a sum: right for add, wrong for mul.
    return "return a + b"


class Editor:
    """What the IDE extension does, over the public API."""

    def __init__(self, url: str, headers: dict[str, str], project: Path) -> None:
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30)
        self.project = project
        self.ledger: dict[str, dict[str, object]] = {}

    def complete(self, prefix: str, suffix: str) -> tuple[str, str]:
        response = self.http.post(
            "/v1/completions",
            json={
                "model": "fake-model",
                "prompt": prefix,
                "suffix": suffix,
                "max_tokens": 40,
                "context": {"language": "python", "file_path": "src/calc.py", "repository": REPO},
            },
        )
        assert response.status_code == 200, response.text
        return response.json()["id"], response.json()["choices"][0]["text"]

    def event(self, completion_id: str, type_: str, **extra: object) -> None:
        response = self.http.post(
            "/v1/events",
            json={
                "events": [
                    {
                        "id": str(uuid.uuid4()),
                        "completion_id": completion_id,
                        "type": type_,
                        "timestamp": datetime.now(UTC).isoformat(),
                        **extra,
                    }
                ]
            },
        )
        assert response.status_code == 200 and response.json()["stored"] == 1, response.text

    def track(self, completion_id: str, inserted: str, current: str, offset: int) -> None:
        entry = {
            "completion_id": completion_id,
            "choice_index": 0,
            "repository": REPO,
            "file_path": "src/calc.py",
            "inserted_text": inserted,
            "current_text": current,
            "start_offset": offset,
            "state": "active",
            "updated_at": datetime.now(UTC).isoformat(),
        }
        self.ledger[completion_id] = entry
        ledger = self.project / ".kaizen" / "ledger.jsonl"
        ledger.parent.mkdir(exist_ok=True)
        with ledger.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        response = self.http.put("/v1/ledger", json={"entries": [entry]})
        assert response.status_code == 200, response.text


def _run_pytest(project: Path, url: str, token: str, run_id: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAIZEN_", "GITHUB_", "CI_", "PYTEST_"))
    }
    env.update({"KAIZEN_URL": url, "KAIZEN_TOKEN": token, "KAIZEN_RUN_ID": run_id})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def test_completion_fate_from_editor_to_ci(
    settings: Settings,
    auth,
    tokens,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    project = tmp_path / "calc"
    (project / "src").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "tests" / "test_calc.py").write_text(TESTS)
    (project / "pytest.ini").write_text("[pytest]\npythonpath = src\n")
    _git(project, "init", "-q")
    _git(project, "remote", "add", "origin", "git@github.com:Acme/Calc.git")

    with live_server(create_app(settings, engine=FakeEngine(reply=_reply))) as server:
        editor = Editor(server.url, auth["ide"], project)
        add_id, add_text = editor.complete(CALC_PREFIX, "\n\n\ndef mul(a, b):\n    pass\n")
        mul_id, mul_text = editor.complete(
            "def add(a, b):\n    return a + b\n\n\n" + MUL_PREFIX, "\n"
        )
        assert add_text == mul_text == "return a + b"
        source = CALC_PREFIX + add_text + "\n\n\n" + MUL_PREFIX + mul_text + "\n"
        (project / "src" / "calc.py").write_text(source)
        for cid, offset in ((add_id, len(CALC_PREFIX)), (mul_id, source.rindex("return"))):
            editor.event(cid, "shown")
            editor.event(cid, "accepted")
            editor.track(cid, "return a + b", "return a + b", offset)
        _git(project, "add", ".")
        _git(project, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "calc")

        first = _run_pytest(project, server.url, tokens["ci"], "local:run-1")
        assert first.returncode == 1, first.stdout  # test_mul fails: the plugin does not mask it
        assert "kaizen: reported run local:run-1" in first.stdout + first.stderr

        # The developer fixes the wrong completion; the editor tracks the edit.
        fixed = source.replace(MUL_PREFIX + "return a + b", MUL_PREFIX + "return a * b")
        (project / "src" / "calc.py").write_text(fixed)
        editor.event(mul_id, "edited", text="return a * b")
        editor.track(mul_id, "return a + b", "return a * b", fixed.rindex("return"))
        second = _run_pytest(project, server.url, tokens["ci"], "local:run-2")
        assert second.returncode == 0, second.stdout

        ops = httpx.Client(base_url=server.url, headers=auth["ops"])
        add = ops.get(f"/v1/completions/{add_id}").json()
        mul = ops.get(f"/v1/completions/{mul_id}").json()
        stats = ops.get("/v1/stats").json()["data"]

    assert [e["type"] for e in add["events"]] == ["shown", "accepted"]
    assert [(o["run_id"], o["status"], o["final_text"], o["tests"]) for o in add["outcomes"]] == [
        ("local:run-1", "passed", "return a + b", ["tests/test_calc.py::test_add"]),
        ("local:run-2", "passed", "return a + b", ["tests/test_calc.py::test_add"]),
    ]
    # The failure and its fix, with both texts: the record the trainer values most.
    assert [
        (o["run_id"], o["status"], o["final_text"], o["run_status"]) for o in mul["outcomes"]
    ] == [
        ("local:run-1", "failed", "return a + b", "failed"),
        ("local:run-2", "passed", "return a * b", "passed"),
    ]
    assert mul["outcomes"][0]["tests"] == ["tests/test_calc.py::test_mul"]
    assert [e["type"] for e in mul["events"]] == ["shown", "accepted", "edited"]
    assert mul["ledger"][0]["current_text"] == "return a * b"
    assert mul["outcomes"][0]["repository"] == REPO
    assert stats == [
        {
            "adapter": None,
            "completions": 2,
            "shown": 2,
            "accepted": 2,
            "acceptance_rate": 1.0,
            "with_outcome": 2,
            "passed": 2,
            "ci_pass_rate": 1.0,
        }
    ]
