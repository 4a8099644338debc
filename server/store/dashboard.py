"""What the ops dashboard plots: per adapter version and day, acceptance and CI pass rates; and
the rollout events of the registry's audit trail, to draw on the same time axis.

The rates count as the canary's judge counts (:mod:`server.store.canary`), so the dashboard
and the canary never disagree on what a version did: served completions only (exploration's
alternatives are no traffic), bucketed by the day (UTC) the completion was served; a
completion is shown or accepted if any event says so; its CI verdict is its latest run's (by
arrival), and a pass whose final text differs from what the server sent is the developer's fix,
counted apart and left out of the pass rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from server.store.canary import completion_signals
from server.store.models import (
    Adapter,
    AdapterTransition,
    Completion,
)


@dataclass
class DailyRates:
    adapter: str | None  # None: the base model
    day: date
    completions: int = 0
    shown: int = 0
    accepted: int = 0
    judged: int = 0  # CI verdicts on the model's own text
    passed: int = 0
    developer_fixes: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.shown if self.shown else None

    @property
    def ci_pass_rate(self) -> float | None:
        return self.passed / self.judged if self.judged else None


def daily_rates(*, session: Session, since: datetime, until: datetime) -> list[DailyRates]:
    """Per adapter and UTC day, for completions served in [since, until); ordered by adapter
    (the base model first), then day. Days without a completion are absent."""
    window = and_(
        Completion.created_at >= since,
        Completion.created_at < until,
        Completion.source == "serve",
    )
    key_of: dict[str, tuple[str | None, date]] = {}
    rows: dict[tuple[str | None, date], DailyRates] = {}
    for completion_id, adapter, created_at in session.execute(
        select(Completion.id, Completion.adapter, Completion.created_at).where(window)
    ):
        key = (adapter, created_at.astimezone(UTC).date())
        key_of[completion_id] = key
        row = rows.setdefault(key, DailyRates(adapter, key[1]))
        row.completions += 1
    if not rows:
        return []

    signals = completion_signals(session=session, window=window)
    for completion_id in signals.shown:
        rows[key_of[completion_id]].shown += 1
    for completion_id in signals.accepted:
        rows[key_of[completion_id]].accepted += 1
    for completion_id, verdict in signals.verdicts.items():
        signals.add_verdict(rows[key_of[completion_id]], verdict)
    return sorted(rows.values(), key=lambda r: (r.adapter is not None, r.adapter or "", r.day))


@dataclass
class RolloutEvent:
    at: datetime
    adapter: str
    kind: str  # see EVENT_KINDS
    from_state: str | None
    to_state: str
    actor: str
    reason: str


# What the time axis shows. A version retired because another replaced it is part of that
# promotion (its transition says "replaced by ..."), not an event of its own.
EVENT_KINDS = ("canary_started", "promoted", "rolled_back", "restored")
_REPLACED = ("replaced by ", "canary replaced by ")


def _kind(from_state: str | None, to_state: str, reason: str) -> str | None:
    if to_state == "canary":
        return "canary_started"
    if to_state == "active":
        return "restored" if from_state == "retired" else "promoted"
    if to_state == "retired" and from_state in ("canary", "active"):
        return None if reason.startswith(_REPLACED) else "rolled_back"
    return None


def rollout_events(*, session: Session, since: datetime, until: datetime) -> list[RolloutEvent]:
    """The audit trail's rollout moves in [since, until), oldest first: a version became the
    canary, was promoted to active, was rolled back (a canary or active version retired by a
    rollback) or restored by one."""
    rows = session.execute(
        select(AdapterTransition, Adapter.name)
        .join(Adapter, Adapter.id == AdapterTransition.adapter_id)
        .where(AdapterTransition.at >= since, AdapterTransition.at < until)
        .where(AdapterTransition.to_state.in_(("canary", "active", "retired")))
        .order_by(AdapterTransition.at, AdapterTransition.id)
    ).all()
    events = []
    for t, name in rows:
        kind = _kind(t.from_state, t.to_state, t.reason or "")
        if kind is not None:
            events.append(
                RolloutEvent(t.at, name, kind, t.from_state, t.to_state, t.actor, t.reason or "")
            )
    return events
