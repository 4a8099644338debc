"""Loading outcome records from a real (migrated SQLite) database, written by the store's own
functions: one record per CI verdict, the failure -> fix case, the time window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.feedback import save_outcome
from trainer.records import context_key, load_outcome_records

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
REPO = "github.com/acme/app"


def _completion(
    cid: str,
    *,
    prompt: str,
    suffix: str | None = None,
    texts: tuple[str, ...] = ("",),
    adapter: str | None = None,
    repository: str | None = REPO,
    file_path: str | None = "src/app/util.py",
) -> CompletionRecord:
    return CompletionRecord(
        id=cid,
        created_at=T0,
        token_id=None,
        endpoint="completions",
        model="qwen",
        adapter=adapter,
        prompt=prompt,
        suffix=suffix,
        params={"max_tokens": 32},
        stream=False,
        context={"language": "python", "file_path": file_path, "repository": repository},
        choices=[ChoiceRecord(index=i, text=t, tokens=3) for i, t in enumerate(texts)],
    )


def _run(
    session: Session,
    run_id: str,
    status: str,
    completions: list[dict[str, Any]],
    *,
    finished_at: datetime | None = None,
    repository: str = REPO,
) -> None:
    run = {
        "run_id": run_id,
        "repository": repository,
        "commit": "9fceb02",
        "branch": "main",
        "status": status,
        "started_at": None,
        "finished_at": finished_at,
        "tests": [],
        "log_tail": "",
    }
    rows = [
        {"choice_index": 0, "file_path": "src/app/util.py", "tests": [], **c} for c in completions
    ]
    result = save_outcome(
        session=session, run=run, completions=rows, raw={"run_id": run_id}, token_id=None
    )
    assert not result.duplicate and not result.unknown_completion_ids


def test_one_record_per_outcome_with_its_context(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        save_completions(
            session=session,
            records=[
                _completion(
                    "cmpl-fim",
                    prompt="def add(a, b):\n    ",
                    suffix="\n",
                    texts=("return a + b", "return b + a"),
                    adapter="kaizen-v3",
                ),
                _completion("cmpl-plain", prompt="def sub(a, b):", texts=(" return a - b",)),
            ],
        )
        _run(
            session,
            "ci:1",
            "passed",
            [
                {"completion_id": "cmpl-fim", "final_text": "return a + b", "status": "passed"},
                {
                    "completion_id": "cmpl-fim",
                    "choice_index": 1,
                    "final_text": "return b + a  # edited",
                    "status": "passed",
                },
                {"completion_id": "cmpl-plain", "final_text": " return a - b", "status": "error"},
            ],
        )
        records = load_outcome_records(session=session)

    assert len(records) == 3
    by_choice = {(r.completion_id, r.choice_index): r for r in records}
    fim = by_choice[("cmpl-fim", 0)]
    assert fim.prompt == "def add(a, b):\n    " and fim.suffix == "\n"
    assert fim.context_key == context_key("def add(a, b):\n    ", "\n")
    assert fim.completion_text == "return a + b" and fim.final_text == "return a + b"
    assert fim.status == "passed" and fim.passed and not fim.failed
    assert (fim.run_id, fim.repository, fim.file_path) == ("ci:1", REPO, "src/app/util.py")
    assert fim.adapter == "kaizen-v3" and fim.endpoint == "completions"
    assert fim.language == "python"
    assert fim.received_at.tzinfo is not None
    assert fim.fixed_text is None
    second = by_choice[("cmpl-fim", 1)]
    assert second.completion_text == "return b + a"  # as served
    assert second.final_text == "return b + a  # edited"  # as CI ran it
    assert second.context_key == fim.context_key  # same prompt and suffix: same context
    plain = by_choice[("cmpl-plain", 0)]
    assert plain.suffix is None and plain.adapter is None
    assert plain.context_key != fim.context_key
    # "error" is no verdict on the code: neither passing nor failing.
    assert plain.status == "error" and not plain.passed and not plain.failed


def test_failure_then_fix_carries_the_fix(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        save_completions(
            session=session,
            records=[
                _completion("cmpl-a", prompt="def add(a, b):\n    ", suffix="\n",
                            texts=("return a - b",)),
                _completion("cmpl-b", prompt="def mul(a, b):\n    ", suffix="\n",
                            texts=("return a * b",)),
            ],
        )  # fmt: skip
        _run(
            session,
            "ci:1",
            "failed",
            [
                {"completion_id": "cmpl-a", "final_text": "return a - b", "status": "failed"},
                # Failed, then passed with the same text: a flaky run, not a fix.
                {"completion_id": "cmpl-b", "final_text": "return a * b", "status": "failed"},
            ],
        )
        _run(
            session,
            "ci:2",
            "passed",
            [
                {"completion_id": "cmpl-a", "final_text": "return a + b", "status": "passed"},
                {"completion_id": "cmpl-b", "final_text": "return a * b", "status": "passed"},
            ],
        )
        records = load_outcome_records(session=session)

    assert [(r.completion_id, r.run_id, r.status) for r in records] == [
        ("cmpl-a", "ci:1", "failed"),
        ("cmpl-b", "ci:1", "failed"),
        ("cmpl-a", "ci:2", "passed"),
        ("cmpl-b", "ci:2", "passed"),
    ]
    failed_a, failed_b, passed_a, passed_b = records
    assert failed_a.final_text == "return a - b"
    assert failed_a.fixed_text == "return a + b"
    assert failed_b.fixed_text is None
    assert passed_a.fixed_text is None and passed_b.fixed_text is None


def test_a_late_spooled_failure_still_finds_its_fix(session_factory) -> None:  # type: ignore[no-untyped-def]
    """The failing run's report was spooled and arrived after the fix's: order by finish."""
    with session_factory() as session:
        save_completions(
            session=session,
            records=[_completion("cmpl-a", prompt="def f(x):\n    ", suffix="\n")],
        )
        _run(
            session,
            "ci:fix",
            "passed",
            [{"completion_id": "cmpl-a", "final_text": "return x", "status": "passed"}],
            finished_at=T0 + timedelta(hours=2),
        )
        _run(
            session,
            "ci:spooled",
            "failed",
            [{"completion_id": "cmpl-a", "final_text": "return y", "status": "failed"}],
            finished_at=T0 + timedelta(hours=1),
        )
        records = load_outcome_records(session=session)

    assert [r.run_id for r in records] == ["ci:spooled", "ci:fix"]
    assert records[0].fixed_text == "return x"


def test_since_keeps_later_runs_only(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        save_completions(
            session=session,
            records=[_completion("cmpl-a", prompt="p1"), _completion("cmpl-b", prompt="p2")],
        )
        _run(session, "ci:old", "passed", [{"completion_id": "cmpl-a", "final_text": "x",
                                            "status": "passed"}])  # fmt: skip
        cut = datetime.now(UTC)
        _run(session, "ci:new", "failed", [{"completion_id": "cmpl-b", "final_text": "y",
                                            "status": "failed"}])  # fmt: skip
        assert [r.run_id for r in load_outcome_records(session=session, since=cut)] == ["ci:new"]
        assert len(load_outcome_records(session=session)) == 2
        assert load_outcome_records(session=session, since=cut + timedelta(days=1)) == []


def test_empty_database(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        assert load_outcome_records(session=session) == []


def test_the_served_record_names_the_repository_and_the_request(session_factory) -> None:  # type: ignore[no-untyped-def]
    """The repository is the editor's, at completion time: a CI run claiming another one does
    not move the completion. The request's parameters, the choice's finish reason and the
    reporting token come along for resampling, cut-off detection and the per-token cap."""
    from server.store.tokens import Role, create_token

    with session_factory() as session:
        token, _ = create_token(session=session, name="ci-x", role=Role.CI)
        record = _completion("cmpl-a", prompt="def f(x):\n    ", suffix="\n", texts=("ret",))
        record.params = {"max_tokens": 3, "stop": ["\n", "x = 1"], "single_line": True}
        record.choices[0].finish_reason = "length"
        save_completions(session=session, records=[record])
        run = {
            "run_id": "ci:claim",
            "repository": "github.com/evil/other",
            "commit": "c0",
            "status": "failed",
            "tests": [],
        }
        save_outcome(
            session=session,
            run=run,
            completions=[{"completion_id": "cmpl-a", "choice_index": 0, "file_path": "f.py",
                          "final_text": "ret", "status": "failed", "tests": []}],
            raw={},
            token_id=token.id,
        )  # fmt: skip
        (loaded,) = load_outcome_records(session=session)
    assert loaded.repository == REPO  # not github.com/evil/other
    assert loaded.token_id == token.id
    assert (loaded.single_line, loaded.stop, loaded.max_tokens) == (True, ("\n", "x = 1"), 3)
    assert loaded.finish_reason == "length"
    assert loaded.cut_off  # ran out of max_tokens and CI ran it unchanged


def test_an_edited_cut_off_text_is_the_developers(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        record = _completion("cmpl-a", prompt="def f(x):\n    ", suffix="\n", texts=("ret",))
        record.choices[0].finish_reason = "length"
        save_completions(session=session, records=[record])
        passed = {"completion_id": "cmpl-a", "final_text": "return x", "status": "passed"}
        _run(session, "ci:1", "passed", [passed])
        (loaded,) = load_outcome_records(session=session)
    assert loaded.finish_reason == "length" and not loaded.cut_off
