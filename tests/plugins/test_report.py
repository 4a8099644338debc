"""Building the outcome report: run ids, branch and commit, log tail, attribution."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kaizen_client.ledger import LedgerEntry, Located
from kaizen_client.report import (
    LOG_TAIL_BYTES,
    LogTail,
    TestResult,
    attribute,
    build_report,
    detect_branch,
    detect_commit,
    detect_run_id,
    refusal_warnings,
    summarise,
    tail_text,
)

from tests.plugins.fake_kaizen import ledger_entry, report_problems


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GITHUB_RUN_ID": "123", "GITHUB_RUN_ATTEMPT": "2"}, "github:123:2"),
        ({"GITHUB_RUN_ID": "123"}, "github:123:1"),
        ({"CI_PIPELINE_ID": "55", "CI_JOB_ID": "987"}, "gitlab:987"),
        ({"CI_PIPELINE_ID": "55"}, "gitlab:55"),
        ({"BUILD_TAG": "jenkins-app-main-42"}, "jenkins:jenkins-app-main-42"),
        ({"KAIZEN_RUN_ID": "mine:1", "GITHUB_RUN_ID": "123"}, "mine:1"),
    ],
)
def test_run_ids_from_ci(env: dict[str, str], expected: str) -> None:
    assert detect_run_id(env) == expected


def test_local_run_ids_are_unique_and_long_ids_are_shortened() -> None:
    first, second = detect_run_id({}), detect_run_id({})
    assert first.startswith("local:") and first != second
    long = detect_run_id({"BUILD_TAG": "x" * 400})
    assert len(long) == 256 and long != detect_run_id({"BUILD_TAG": "x" * 399})


def test_branch_and_commit(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    assert detect_commit(tmp_path, {}) == "unknown"
    assert detect_commit(tmp_path, {"GITHUB_SHA": "abc123"}) == "abc123"
    assert detect_branch(tmp_path, {}) is None
    git("init", "-q", "-b", "feature/x")
    git("commit", "-q", "--allow-empty", "-m", "one")
    assert detect_commit(tmp_path, {"GITHUB_SHA": "abc123"}) == git("rev-parse", "HEAD")
    assert detect_branch(tmp_path, {}) == "feature/x"
    assert detect_branch(tmp_path, {"GITHUB_REF_NAME": "main"}) == "main"
    assert detect_branch(tmp_path, {"GITHUB_HEAD_REF": "pr", "GITHUB_REF_NAME": "1/merge"}) == "pr"
    assert detect_branch(tmp_path, {"GIT_BRANCH": "origin/dev"}) == "dev"
    git("checkout", "-q", "--detach")
    assert detect_branch(tmp_path, {}) is None


def test_tail_keeps_the_last_64_kib_at_a_character_boundary() -> None:
    text = "é" * LOG_TAIL_BYTES  # two bytes each
    tail = tail_text("start" + text)
    assert len(tail.encode()) <= LOG_TAIL_BYTES and set(tail) == {"é"}
    assert tail_text("short") == "short"
    log = LogTail(limit=10)
    for chunk in (b"0123456789", "abcdé".encode(), b"fgh"):
        log.feed(chunk)
    assert log.text() == "9abcdéfgh"
    log.feed("ééééé".encode())  # exactly the limit, cut inside nothing
    assert log.text() == "ééééé"
    log.feed(b"x")  # cuts the first "é" in half: the half is dropped
    assert log.text() == "éééé" + "x"


def located(completion_id: str) -> Located:
    entry = LedgerEntry.from_dict(ledger_entry(completion_id, "return 1"))
    return Located(entry, Path("/x/src/calc.py"), "return 1", "current_text", 0, 1, 1)


def test_attribution() -> None:
    items = [located(c) for c in ("cmpl-pass", "cmpl-fail", "cmpl-none", "cmpl-skip", "cmpl-err")]
    executed = {
        ("cmpl-pass", 0): ["t::a", "t::b", "t::a"],
        ("cmpl-fail", 0): ["t::a", "t::c"],
        ("cmpl-skip", 0): ["t::s"],
        ("cmpl-err", 0): ["t::e"],
    }
    statuses = {"t::a": "passed", "t::b": "passed", "t::c": "failed", "t::s": "skipped"}
    statuses["t::e"] = "error"
    out = {c["completion_id"]: c for c in attribute(items, "failed", executed, statuses)}
    assert out["cmpl-pass"]["status"] == "passed" and out["cmpl-pass"]["tests"] == ["t::a", "t::b"]
    assert out["cmpl-fail"]["status"] == "failed" and out["cmpl-fail"]["tests"] == ["t::a", "t::c"]
    assert out["cmpl-err"]["status"] == "failed"
    for fallback in ("cmpl-none", "cmpl-skip"):
        assert out[fallback]["status"] == "failed" and out[fallback]["tests"] == []
    run_level = attribute(items, "build_failed")
    assert {c["status"] for c in run_level} == {"build_failed"}
    assert run_level[0] == {
        "completion_id": "cmpl-pass",
        "choice_index": 0,
        "file_path": "src/calc.py",
        "final_text": "return 1",
        "status": "build_failed",
        "tests": [],
    }


def test_build_report_has_exactly_the_protocol_keys() -> None:
    report = build_report(
        run_id="github:1:1",
        repository="github.com/acme/app",
        commit="abc",
        branch=None,
        status="failed",
        started_at="2026-11-22T10:00:00+00:00",
        finished_at="2026-11-22T10:00:01+00:00",
        tests=[TestResult("t::a", "failed", 0.5, "assert 3 == -1" + "x" * 5000)],
        log_tail="y" * 100_000,
        completions=attribute([located("cmpl-a")], "failed"),
    )
    assert report_problems(report) == []
    assert len(report["tests"][0]["message"]) <= 2000
    assert len(report["log_tail"]) == LOG_TAIL_BYTES
    assert summarise(report) == "1 completion (1 failed)"
    with pytest.raises(ValueError):
        build_report(
            run_id="r",
            repository="x",
            commit="c",
            branch=None,
            status="green",
            started_at=None,
            finished_at=None,
        )


def test_summary_line() -> None:
    completions = [{"status": "passed"}, {"status": "failed"}]
    assert summarise({"completions": completions}) == "2 completions (1 passed, 1 failed)"
    assert summarise({"completions": []}) == "0 completions"


def test_refusal_warnings_name_the_completions_and_what_to_do() -> None:
    answer = {
        "refused": [
            {"completion_id": "cmpl-a", "choice_index": 0, "reason": "repository_not_in_scope"},
            {"completion_id": "cmpl-a", "choice_index": 1, "reason": "repository_not_in_scope"},
            {"completion_id": "cmpl-b", "choice_index": 0, "reason": "repository_not_in_scope"},
            {"completion_id": "cmpl-c", "choice_index": 0, "reason": "something_new"},
        ]
    }
    first, second = refusal_warnings(answer)
    assert first.startswith("kaizen: warning: the server refused 2 completions (cmpl-a, cmpl-b)")
    assert "--role ci --repo <that repository>" in first and "--all-repos" in first
    assert second == "kaizen: warning: the server refused 1 completion (cmpl-c): something_new"
    many = {"refused": [{"completion_id": f"c{i}", "reason": "stale"} for i in range(8)]}
    assert "(c0, c1, c2, c3, c4 and 3 more)" in refusal_warnings(many)[0]


@pytest.mark.parametrize(
    "answer", [None, {}, {"refused": None}, {"refused": "x"}, {"refused": [1, {"reason": "x"}]}]
)
def test_refusal_warnings_tolerate_older_or_odd_answers(answer: object) -> None:
    assert refusal_warnings(answer) == []  # type: ignore[arg-type]
