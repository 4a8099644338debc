"""CI-side exploration (``kaizen_client.explore`` through pytest-kaizen): alternatives from the
server spliced into the checkout, the attributed tests re-run against each in a subprocess,
sealed verdicts reported as a run of their own, and the working tree left byte for byte as it
was, including when the plugin is killed mid-exploration."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kaizen_client.explore import journal_path, judge

from tests.plugins.conftest import QUIET_PLUGINS, Project
from tests.plugins.fake_kaizen import FakeKaizen, _handler, ledger_entry

TEST_ADD = """\
from calc import add


def test_add():
    assert add(1, 2) == 3
"""
SLOW = "__import__('time').sleep(60) or a + b"  # a test run that lasts until it is killed


@contextmanager
def resampling_server(
    alternatives: list[dict[str, Any]], refuse: frozenset[str] = frozenset()
) -> Iterator[FakeKaizen]:
    """The fake server plus ``POST /v1/resample`` answering ``alternatives`` (the asks are kept
    in ``state.requests``, bodies in ``state.asks``), 403 for the completions in ``refuse``."""
    state = FakeKaizen()
    state.asks = []  # type: ignore[attr-defined]
    base = _handler(state)

    class Handler(base):  # type: ignore[misc,valid-type]
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/v1/resample":
                return super().do_POST()
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self._begin():
                return
            ask = json.loads(raw)
            state.asks.append(ask)  # type: ignore[attr-defined]
            if ask["completion_id"] in refuse:
                self._error(403, "not in this token's repositories", "repository_not_in_scope")
                return
            self._answer(
                200,
                {
                    "id": f"cmpl-alt-{len(state.asks)}",  # type: ignore[attr-defined]
                    "parent_id": ask["completion_id"],
                    "adapter": None,
                    "alternatives": [
                        {"index": i, "finish_reason": "stop", **a}
                        for i, a in enumerate(alternatives[: ask["n"]])
                    ],
                    "remaining": 10,
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the spool aside) with its digest, mode and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "spool" not in path.parts:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = f"{digest}:{stat.st_mode:o}:{stat.st_mtime_ns}"
    return out


def failing_project(project: Project) -> None:
    project.write("src/calc.py", "def add(a, b):\n    return a - b\n")
    project.write_ledger(ledger_entry("cmpl-add", "return a + b", current_text="return a - b"))
    project.write("tests/test_calc.py", TEST_ADD)


def env_for(server: FakeKaizen, **extra: str) -> dict[str, str]:
    return {"KAIZEN_URL": server.url, "KAIZEN_TOKEN": server.token, **extra}


def test_alternatives_get_sealed_verdicts_and_the_tree_is_untouched(project: Project) -> None:
    failing_project(project)
    alternatives = [
        {"text": "return a + b"},  # passes
        {"text": "return a * b"},  # 1 * 2 != 3: fails
        {"text": "return (a +"},  # does not parse: the test module cannot import it
        {"text": "return a + b  "},  # the first again, but for blanks: judged once
        {"text": "return a + b + 0", "finish_reason": "length"},  # cut off: not run
        {"text": "return a - b"},  # what CI ran already
    ]
    before = snapshot(project.path)
    with resampling_server(alternatives) as server:
        run = project.pytest(
            "--kaizen-explore", "2", "--kaizen-explore-k", "6", env=env_for(server)
        )
    assert run.returncode == 1, run.output  # the build's result is the tests', unchanged
    assert snapshot(project.path) == before
    main, explored = server.reports
    assert main["completions"][0]["status"] == "failed"
    assert explored["run_id"] == main["run_id"] + ":explore"
    assert server.asks == [{"completion_id": "cmpl-add", "choice_index": 0, "n": 6}]  # type: ignore[attr-defined]
    got = [
        (c["choice_index"], c["final_text"], c["status"], c["tests"])
        for c in explored["completions"]
    ]
    node = ["tests/test_calc.py::test_add"]
    assert got == [
        (0, "return a + b", "passed", node),
        (1, "return a * b", "failed", node),
        (2, "return (a +", "build_failed", []),
        (3, "return a + b  ", "passed", node),
    ]
    assert {c["completion_id"] for c in explored["completions"]} == {"cmpl-alt-1"}
    assert "kaizen: explored 1 completion(s): 3 alternative(s) judged" in run.stdout
    assert f"kaizen: reported run {explored['run_id']}: 4 completions" in run.stdout


def test_off_unless_asked_and_only_with_per_test_verdicts(project: Project) -> None:
    failing_project(project)
    with resampling_server([{"text": "return a + b"}]) as server:
        project.pytest(env=env_for(server))
        assert len(server.reports) == 1 and server.asks == []  # type: ignore[attr-defined]
        # Under coverage's tracer there is no per-test attribution: nothing to explore.
        project.write("tests/conftest.py", "import sys\nsys.settrace(lambda *a: None)\n")
        project.pytest("--kaizen-explore", "3", env=env_for(server, KAIZEN_RUN_ID="r2"))
        assert server.asks == []  # type: ignore[attr-defined]


def test_environment_turns_it_on_and_the_budget_bounds_it(project: Project) -> None:
    failing_project(project)
    before = snapshot(project.path)
    with resampling_server([{"text": SLOW}, {"text": "return a + b"}]) as server:
        started = time.monotonic()
        run = project.pytest(env=env_for(server, KAIZEN_EXPLORE="1", KAIZEN_EXPLORE_BUDGET="4"))
        took = time.monotonic() - started
    assert run.returncode == 1, run.output
    assert took < 30, run.output  # not the 60 s the alternative's test would take
    assert "1 alternative(s) judged (verdicts: none, 1 skipped)" in run.stdout, run.stdout
    assert "stopped: the 4 s budget ran out" in run.stdout
    assert len(server.reports) == 1  # the slow one has no verdict; no time left for more
    assert snapshot(project.path) == before


def _spliced(path: Path, original: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while path.read_bytes() == original:
        assert time.monotonic() < deadline, "the alternative was never spliced in"
        time.sleep(0.05)


def _guardians(journal: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--guard" in cmdline and str(journal).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("kill_guardian", [False, True])
def test_killed_mid_exploration_the_tree_comes_back(project: Project, kill_guardian: bool) -> None:
    failing_project(project)
    calc = project.path / "src" / "calc.py"
    original = calc.read_bytes()
    before = snapshot(project.path)
    with resampling_server([{"text": SLOW}]) as server:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env_for(server)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *QUIET_PLUGINS, "--kaizen-explore", "1"],
            cwd=project.path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _spliced(calc, original)
            journal = journal_path(project.path)
            assert journal.is_file()
            # The guardian was started before the splice; under load its exec may lag.
            deadline = time.monotonic() + 20
            while len(guardians := _guardians(journal)) != 1:
                assert time.monotonic() < deadline, guardians
                time.sleep(0.05)
            if kill_guardian:
                os.kill(guardians[0], signal.SIGKILL)
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)  # no handler, no finally: only the guardian is left
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        if kill_guardian:
            # Nobody left to restore it: the next run does, before it reads the tree.
            assert calc.read_bytes() != original
            run = project.pytest(env=env_for(server, KAIZEN_RUN_ID="after-kill"))
            assert "restored 1 file(s) an interrupted exploration left modified" in run.output
            assert run.returncode == 1  # it tested the original code, not the alternative
        else:
            # Done when the guardian has written the file back and cleared the journal.
            deadline = time.monotonic() + 30
            while journal.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    assert calc.read_bytes() == original
    assert snapshot(project.path) == before
    assert not journal.exists()


def test_kaizen_report_passes_exploration_to_pytest(project: Project) -> None:
    failing_project(project)
    with resampling_server([{"text": "return a + b"}]) as server:
        run = project.kaizen_report(
            "--explore",
            "1",
            "--explore-k",
            "1",
            "--",
            sys.executable,
            "-m",
            "pytest",
            *QUIET_PLUGINS,
            env=env_for(server),
        )
    assert run.returncode == 1, run.output
    explored = [r for r in server.reports if r["run_id"].endswith(":explore")]
    assert [c["status"] for c in explored[0]["completions"]] == ["passed"]


def test_judge_seals_only_what_ran() -> None:
    node = ["t.py::a", "t.py::b"]

    def results(**tests: str) -> dict[str, Any]:
        return {
            "collected": [f"t.py::{n}" for n in tests],
            "collection_errors": 0,
            "tests": {f"t.py::{n}": s for n, s in tests.items()},
        }

    assert judge(results(a="passed", b="passed"), node, 0).status == "passed"
    assert judge(results(a="passed", b="failed"), node, 1).status == "failed"
    assert judge(results(a="passed", b="error"), node, 1).status == "failed"
    # A skip (or an xfail) is no pass; a test not collected gives no verdict.
    assert judge(results(a="passed", b="skipped"), node, 0).status is None
    assert judge(results(a="passed"), node, 0).status is None
    # More tests ran than were attributed (a node id matched more): not sealed as a pass.
    assert judge(results(a="passed", b="passed", c="passed"), node, 0).status is None
    # The exit status must agree with the reports.
    assert judge(results(a="passed", b="passed"), node, 1).status is None
    assert judge(results(a="failed", b="passed"), node, 2).status is None
    assert judge({"collected": [], "collection_errors": 1, "tests": {}}, node, 2).status == (
        "build_failed"
    )
    assert judge(None, node, 0).status is None


def test_a_refused_completion_is_skipped_and_the_next_explored(project: Project) -> None:
    project.write(
        "src/calc.py", "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
    )
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b", current_text="return a - b"),
        ledger_entry("cmpl-mul", "return a * b"),
    )
    project.write(
        "tests/test_calc.py",
        "from calc import mul\n" + TEST_ADD + "\n\ndef test_mul():\n    assert mul(2, 3) == 6\n",
    )
    with resampling_server([{"text": "return a + b"}], refuse=frozenset({"cmpl-add"})) as server:
        run = project.pytest(
            "--kaizen-explore", "2", "--kaizen-explore-k", "1", env=env_for(server)
        )
    assert run.returncode == 1, run.output
    # Failures first: the refused one was asked for, then the passing one explored.
    assert [a["completion_id"] for a in server.asks] == ["cmpl-add", "cmpl-mul"]  # type: ignore[attr-defined]
    assert "kaizen: no alternatives for cmpl-add" in run.stdout
    [explored] = [r for r in server.reports if r["run_id"].endswith(":explore")]
    assert [(c["final_text"], c["status"]) for c in explored["completions"]] == [
        ("return a + b", "failed")
    ]
