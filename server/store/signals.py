"""Signals on completions that no test judged: executability (``completion_executability``)
and judge verdicts (``judge_verdicts``), stored per text of a choice; and the choices no CI run
has a verdict on, which those signals are for.

A signal is never a verdict: readers that also see an outcome for the same choice take the
outcome (``trainer.pairs``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from server.store.models import (
    Completion,
    CompletionExecutability,
    CompletionOutcome,
    JudgeVerdictRow,
    RecordedChoice,
)

__all__ = [
    "choices_without_outcome",
    "executability_checks",
    "judge_verdicts",
    "record_executability",
    "record_judge_verdicts",
    "text_sha256",
]

CHECKED_IN = ("ci", "sandbox")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def record_executability(
    *,
    session: Session,
    completion_id: str,
    choice_index: int,
    text: str,
    result: Mapping[str, Any],
    checked_in: str,
) -> bool:
    """Store ``result`` (``kaizen_client.executability.Executability.to_json()``) for one text;
    False (nothing written) when that text was already checked in that environment."""
    if checked_in not in CHECKED_IN:
        raise ValueError(f"checked_in must be one of {CHECKED_IN}, not {checked_in!r}")
    digest = text_sha256(text)
    found = session.scalar(
        select(CompletionExecutability.id).where(
            CompletionExecutability.completion_id == completion_id,
            CompletionExecutability.choice_index == choice_index,
            CompletionExecutability.text_sha256 == digest,
            CompletionExecutability.checked_in == checked_in,
        )
    )
    if found is not None:
        return False
    session.add(
        CompletionExecutability(
            completion_id=completion_id,
            choice_index=choice_index,
            text_sha256=digest,
            checked_in=checked_in,
            parses=bool(result["parses"]),
            imports_ok=result.get("imports"),
            api_ok=result.get("api"),
            runs=result.get("runs"),
            executable=bool(result["executable"]),
            problems=list(result.get("problems") or []),
        )
    )
    session.commit()
    return True


def record_judge_verdicts(
    *, session: Session, judge_name: str, prompt_version: str, rows: Iterable[Mapping[str, Any]]
) -> int:
    """Store verdicts, each ``{"completion_id", "choice_index", "text", "answers", "score",
    "raw"}``; a text this judge already answered under this questionnaire is kept as it was.
    Returns how many were written."""
    written = 0
    for row in rows:
        digest = text_sha256(row["text"])
        found = session.scalar(
            select(JudgeVerdictRow.id).where(
                JudgeVerdictRow.completion_id == row["completion_id"],
                JudgeVerdictRow.choice_index == row["choice_index"],
                JudgeVerdictRow.text_sha256 == digest,
                JudgeVerdictRow.judge_name == judge_name,
                JudgeVerdictRow.prompt_version == prompt_version,
            )
        )
        if found is not None:
            continue
        session.add(
            JudgeVerdictRow(
                completion_id=row["completion_id"],
                choice_index=row["choice_index"],
                text_sha256=digest,
                judge_name=judge_name,
                prompt_version=prompt_version,
                answers=dict(row["answers"]),
                score=row.get("score"),
                raw=row["raw"],
            )
        )
        written += 1
    session.commit()
    return written


def judge_verdicts(*, session: Session, completion_ids: Sequence[str]) -> list[JudgeVerdictRow]:
    """Every stored judge verdict on these completions, oldest first."""
    if not completion_ids:
        return []
    return list(
        session.scalars(
            select(JudgeVerdictRow)
            .where(JudgeVerdictRow.completion_id.in_(list(completion_ids)))
            .order_by(JudgeVerdictRow.id)
        )
    )


def executability_checks(
    *, session: Session, completion_ids: Sequence[str], checked_in: str
) -> dict[tuple[str, int, str], CompletionExecutability]:
    """The checks of these completions made in one environment, by (completion id, choice
    index, text sha256); the newest wins."""
    if not completion_ids:
        return {}
    rows = session.scalars(
        select(CompletionExecutability)
        .where(
            CompletionExecutability.completion_id.in_(list(completion_ids)),
            CompletionExecutability.checked_in == checked_in,
        )
        .order_by(CompletionExecutability.id)
    )
    return {(r.completion_id, r.choice_index, r.text_sha256): r for r in rows}


def choices_without_outcome(
    *, session: Session, until: datetime | None = None
) -> list[tuple[Completion, RecordedChoice]]:
    """Every recorded choice (of a completion created at or before ``until``) that no CI run
    has an outcome on, oldest completion first."""
    no_outcome = ~exists().where(
        CompletionOutcome.completion_id == RecordedChoice.completion_id,
        CompletionOutcome.choice_index == RecordedChoice.index,
    )
    query = (
        select(Completion, RecordedChoice)
        .join(RecordedChoice, RecordedChoice.completion_id == Completion.id)
        .where(no_outcome)
        .order_by(Completion.created_at, Completion.id, RecordedChoice.index)
    )
    if until is not None:
        query = query.where(Completion.created_at <= until)
    return [(c, ch) for c, ch in session.execute(query).tuples()]
