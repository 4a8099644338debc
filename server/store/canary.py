"""What the canary is judged on: per adapter, over completions served in a window (while the
canary ran), how many were shown and accepted, and how many CI verdicts are the model's own.

A CI verdict counts for the completion's latest run (by arrival). A passed verdict whose final
text differs from what the server sent is the developer's fix, not the model's: it is left out
of the pass rate (neither a pass nor a trial) and counted apart as ``developer_fixes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session

from server.store.models import (
    CiRun,
    Completion,
    CompletionEvent,
    CompletionOutcome,
    RecordedChoice,
)

SHOWN = ("shown", "accepted", "partially_accepted", "rejected", "edited")
ACCEPTED = ("accepted", "partially_accepted")


@dataclass
class CanaryCounts:
    adapter: str | None
    shown: int = 0
    accepted: int = 0
    judged: int = 0  # CI verdicts on the model's own text
    passed: int = 0
    developer_fixes: int = 0  # passed only after the developer changed the text: left out


DEVELOPER_FIX = "developer_fix"  # a verdict that is the developer's, not the model's


@dataclass
class CompletionSignals:
    """What users and CI said about the completions of a window: which were shown, which
    accepted, and each one's verdict (its latest run's status, or :data:`DEVELOPER_FIX`)."""

    shown: set[str]
    accepted: set[str]
    verdicts: dict[str, str]

    @staticmethod
    def add_verdict(into: CanaryCounts | Any, verdict: str) -> None:
        """Count ``verdict`` into anything with ``judged``, ``passed`` and ``developer_fixes``."""
        if verdict == DEVELOPER_FIX:
            into.developer_fixes += 1
            return
        into.judged += 1
        into.passed += verdict == "passed"


def completion_signals(*, session: Session, window: ColumnElement[bool]) -> CompletionSignals:
    """The signals of the completions ``window`` (a condition on :class:`Completion`) selects,
    counted as the module docstring says; the canary and the ops dashboard both use them."""
    shown: set[str] = set()
    accepted: set[str] = set()
    for completion_id, kind in session.execute(
        select(CompletionEvent.completion_id, CompletionEvent.type)
        .join(Completion, Completion.id == CompletionEvent.completion_id)
        .where(window, CompletionEvent.type.in_(SHOWN))
    ):
        shown.add(completion_id)
        if kind in ACCEPTED:
            accepted.add(completion_id)
    outcomes = session.execute(
        select(
            CompletionOutcome.completion_id,
            CompletionOutcome.status,
            CompletionOutcome.final_text,
            RecordedChoice.text,
        )
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
        .join(Completion, Completion.id == CompletionOutcome.completion_id)
        .outerjoin(
            RecordedChoice,
            and_(
                RecordedChoice.completion_id == CompletionOutcome.completion_id,
                RecordedChoice.index == CompletionOutcome.choice_index,
            ),
        )
        .where(window)
        .order_by(CiRun.received_at, CompletionOutcome.id)
    ).all()
    latest = {row.completion_id: row for row in outcomes}  # ordered: the last run wins
    verdicts = {}
    for completion_id, status, final_text, served in latest.values():
        fixed = status == "passed" and served is not None and final_text.strip() != served.strip()
        verdicts[completion_id] = DEVELOPER_FIX if fixed else status
    return CompletionSignals(shown, accepted, verdicts)


def canary_counts(
    *, session: Session, adapters: Sequence[str | None], since: datetime, until: datetime
) -> dict[str | None, CanaryCounts]:
    """Counts per adapter (None: the base model) for completions created in [since, until)."""
    counts = {name: CanaryCounts(name) for name in adapters}
    named = [a for a in adapters if a is not None]
    which = Completion.adapter.in_(named)
    if None in counts:
        which = which | Completion.adapter.is_(None)
    # Alternatives sampled for CI-side exploration are no user traffic: they would weigh the
    # version that sampled them (always the active one) with verdicts nobody was served.
    window = and_(
        Completion.created_at >= since,
        Completion.created_at < until,
        Completion.source == "serve",
        which,
    )
    adapter_of = dict(
        session.execute(select(Completion.id, Completion.adapter).where(window)).all()
    )
    if not adapter_of:
        return counts
    signals = completion_signals(session=session, window=window)
    for completion_id in signals.shown:
        counts[adapter_of[completion_id]].shown += 1
    for completion_id in signals.accepted:
        counts[adapter_of[completion_id]].accepted += 1
    for completion_id, verdict in signals.verdicts.items():
        signals.add_verdict(counts[adapter_of[completion_id]], verdict)
    return counts
