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

from sqlalchemy import and_, select
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
    events = session.execute(
        select(CompletionEvent.completion_id, CompletionEvent.type)
        .join(Completion, Completion.id == CompletionEvent.completion_id)
        .where(window, CompletionEvent.type.in_(SHOWN))
    ).all()
    shown: set[str] = set()
    accepted: set[str] = set()
    for completion_id, kind in events:
        shown.add(completion_id)
        if kind in ACCEPTED:
            accepted.add(completion_id)
    for completion_id in shown:
        counts[adapter_of[completion_id]].shown += 1
    for completion_id in accepted:
        counts[adapter_of[completion_id]].accepted += 1

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
    for completion_id, status, final_text, served in latest.values():
        c = counts[adapter_of[completion_id]]
        if status == "passed" and served is not None and final_text.strip() != served.strip():
            c.developer_fixes += 1
            continue
        c.judged += 1
        c.passed += status == "passed"
    return counts
