"""Executability and judge verdicts stored per text of a completion (server/store/signals.py),
and the choices no CI run has a verdict on, on a migrated SQLite database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.store import signals
from server.store.models import CompletionExecutability, RecordedChoice
from tests.utils.dashboard_rows import completion, outcome

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EXECUTABLE = {
    "parses": True,
    "imports": True,
    "api": True,
    "runs": None,
    "problems": [],
    "executable": True,
}


def test_executability_is_stored_once_per_text_and_environment(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory() as session:
        completion(session, "cmpl-1", adapter=None, at=T0)
        broken = {**EXECUTABLE, "api": False, "executable": False, "problems": ["m has no x"]}
        kw = {"session": session, "completion_id": "cmpl-1", "choice_index": 0}
        assert signals.record_executability(**kw, text="a", result=EXECUTABLE, checked_in="ci")
        assert not signals.record_executability(**kw, text="a", result=broken, checked_in="ci")
        assert signals.record_executability(**kw, text="a", result=broken, checked_in="sandbox")
        assert signals.record_executability(**kw, text="b", result=broken, checked_in="ci")
        with pytest.raises(ValueError, match="checked_in"):
            signals.record_executability(**kw, text="c", result=broken, checked_in="laptop")
        rows = session.scalars(
            select(CompletionExecutability).order_by(CompletionExecutability.id)
        ).all()
    assert [(r.checked_in, r.executable, r.api_ok) for r in rows] == [
        ("ci", True, True),
        ("sandbox", False, False),
        ("ci", False, False),
    ]
    assert rows[0].text_sha256 == signals.text_sha256("a") and rows[1].problems == ["m has no x"]


def test_judge_verdicts_keep_judge_and_questionnaire(
    session_factory: sessionmaker[Session],
) -> None:
    row = {
        "completion_id": "cmpl-1",
        "choice_index": 0,
        "text": "return a + b",
        "answers": {"api": True, "consistent": None, "runs": False},
        "score": 0.5,
        "raw": "api: yes\nconsistent: maybe\nruns: no",
    }
    with session_factory() as session:
        completion(session, "cmpl-1", adapter=None, at=T0)
        assert (
            signals.record_judge_verdicts(
                session=session, judge_name="tiny", prompt_version="q3-v2", rows=[row, row]
            )
            == 1
        )
        # Another questionnaire is another verdict.
        assert (
            signals.record_judge_verdicts(
                session=session, judge_name="tiny", prompt_version="q3-v3", rows=[row]
            )
            == 1
        )
        stored = signals.judge_verdicts(session=session, completion_ids=["cmpl-1"])
    assert [(v.judge_name, v.prompt_version) for v in stored] == [
        ("tiny", "q3-v2"),
        ("tiny", "q3-v3"),
    ]
    assert stored[0].answers == {"api": True, "consistent": None, "runs": False}
    assert stored[0].raw == row["raw"] and stored[0].score == 0.5


def test_choices_without_outcome(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        completion(session, "cmpl-seen", adapter=None, at=T0)
        completion(session, "cmpl-open", adapter=None, at=T0 + timedelta(minutes=1))
        session.add(RecordedChoice(completion_id="cmpl-open", index=1, text="return b + a"))
        session.commit()
        completion(session, "cmpl-late", adapter=None, at=T0 + timedelta(hours=2))
        outcome(session, "cmpl-seen", "passed", at=T0 + timedelta(minutes=5))
        found = signals.choices_without_outcome(session=session, until=T0 + timedelta(hours=1))
        everything = signals.choices_without_outcome(session=session)
    assert [(c.id, ch.index) for c, ch in found] == [("cmpl-open", 0), ("cmpl-open", 1)]
    assert [c.id for c, _ in everything] == ["cmpl-open", "cmpl-open", "cmpl-late"]
