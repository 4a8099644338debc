"""Feedback on completions: IDE events, the ledger of accepted completions, CI runs and outcomes.

Writes are idempotent and safe with several replicas on one database: duplicates are detected
by primary key with ``INSERT ... ON CONFLICT`` (SQLite and PostgreSQL both support it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, distinct, func, select
from sqlalchemy.orm import Session

from server.store.db import dialect_insert
from server.store.models import (
    CiRun,
    Completion,
    CompletionEvent,
    CompletionOutcome,
    LedgerEntry,
)


def known_completion_ids(*, session: Session, ids: Iterable[str]) -> set[str]:
    wanted = set(ids)
    if not wanted:
        return set()
    return set(session.scalars(select(Completion.id).where(Completion.id.in_(wanted))))


@dataclass
class EventsResult:
    stored: int = 0
    duplicates: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)


def save_events(
    *, session: Session, events: Sequence[dict[str, Any]], token_id: int | None
) -> EventsResult:
    """Store events of known completions once each (by event id); report the rest."""
    known = known_completion_ids(session=session, ids=(e["completion_id"] for e in events))
    result = EventsResult(
        unknown_completion_ids=sorted({e["completion_id"] for e in events} - known)
    )
    ours = [e for e in events if e["completion_id"] in known]
    rows = {e["id"]: {**e, "token_id": token_id} for e in ours}  # a batch may repeat an event
    if rows:
        existing = set(
            session.scalars(select(CompletionEvent.id).where(CompletionEvent.id.in_(rows)))
        )
        new = [row for event_id, row in rows.items() if event_id not in existing]
        if new:
            table = CompletionEvent.__table__
            session.execute(dialect_insert(session, table).values(new).on_conflict_do_nothing())
        session.commit()
        result.stored = len(new)
        result.duplicates = len(ours) - len(new)
    return result


@dataclass
class LedgerResult:
    stored: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)


def upsert_ledger(*, session: Session, entries: Sequence[dict[str, Any]]) -> LedgerResult:
    """Insert or update entries by (completion id, choice); an older update never wins."""
    known = known_completion_ids(session=session, ids=(e["completion_id"] for e in entries))
    result = LedgerResult(
        unknown_completion_ids=sorted({e["completion_id"] for e in entries} - known)
    )
    table = LedgerEntry.__table__
    for entry in entries:
        if entry["completion_id"] not in known:
            continue
        stmt = dialect_insert(session, table).values(**entry)
        updatable = {
            k: stmt.excluded[k] for k in entry if k not in ("completion_id", "choice_index")
        }
        stmt = stmt.on_conflict_do_update(
            index_elements=["completion_id", "choice_index"],
            set_=updatable,
            where=table.c.updated_at < stmt.excluded.updated_at,
        )
        session.execute(stmt)
        result.stored += 1
    session.commit()
    return result


def active_ledger(
    *, session: Session, repository: str, since: datetime, limit: int = 5000
) -> list[LedgerEntry]:
    query = (
        select(LedgerEntry)
        .where(
            LedgerEntry.repository == repository,
            LedgerEntry.state == "active",
            LedgerEntry.updated_at >= since,
        )
        .order_by(LedgerEntry.updated_at.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


@dataclass
class OutcomeResult:
    duplicate: bool = False
    completions: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)


def save_outcome(
    *,
    session: Session,
    run: dict[str, Any],
    completions: Sequence[dict[str, Any]],
    raw: dict[str, Any],
    token_id: int | None,
) -> OutcomeResult:
    """Store a CI run once (by run id) with its attribution to known completions."""
    known = known_completion_ids(session=session, ids=(c["completion_id"] for c in completions))
    result = OutcomeResult(
        unknown_completion_ids=sorted({c["completion_id"] for c in completions} - known)
    )
    inserted = session.execute(
        dialect_insert(session, CiRun.__table__)
        .values(**run, raw=raw, token_id=token_id)
        .on_conflict_do_nothing()
    ).rowcount
    if not inserted:
        session.rollback()
        result.duplicate = True
        return result
    rows = [{**c, "run_id": run["run_id"]} for c in completions if c["completion_id"] in known]
    if rows:
        session.execute(
            dialect_insert(session, CompletionOutcome.__table__)
            .values(rows)
            .on_conflict_do_nothing()
        )
    session.commit()
    result.completions = len(rows)
    return result


@dataclass
class CompletionDetail:
    completion: Completion
    events: list[CompletionEvent]
    ledger: list[LedgerEntry]
    outcomes: list[tuple[CompletionOutcome, CiRun]]


def completion_detail(*, session: Session, completion_id: str) -> CompletionDetail | None:
    completion = session.get(Completion, completion_id)
    if completion is None:
        return None
    events = session.scalars(
        select(CompletionEvent)
        .where(CompletionEvent.completion_id == completion_id)
        .order_by(CompletionEvent.timestamp)
    ).all()
    ledger = session.scalars(
        select(LedgerEntry).where(LedgerEntry.completion_id == completion_id)
    ).all()
    outcomes = session.execute(
        select(CompletionOutcome, CiRun)
        .join(CiRun, CiRun.run_id == CompletionOutcome.run_id)
        .where(CompletionOutcome.completion_id == completion_id)
        .order_by(CiRun.received_at)
    ).all()
    return CompletionDetail(
        completion=completion,
        events=list(events),
        ledger=list(ledger),
        outcomes=[(o, r) for o, r in outcomes],
    )


@dataclass
class AdapterStats:
    adapter: str | None
    completions: int
    shown: int
    accepted: int
    with_outcome: int
    passed: int

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.shown if self.shown else None

    @property
    def ci_pass_rate(self) -> float | None:
        return self.passed / self.with_outcome if self.with_outcome else None


def adapter_stats(*, session: Session, since: datetime, until: datetime) -> list[AdapterStats]:
    """Per adapter, over completions created in [since, until): acceptance and CI pass rates.

    A completion counts as shown/accepted if any event says so; its CI verdict is its latest
    outcome (by the run's arrival), so a failure later fixed counts as passed.
    """
    window = and_(Completion.created_at >= since, Completion.created_at < until)
    shown = select(distinct(CompletionEvent.completion_id)).where(
        CompletionEvent.type.in_(("shown", "accepted", "partially_accepted", "rejected", "edited"))
    )
    accepted = select(distinct(CompletionEvent.completion_id)).where(
        CompletionEvent.type.in_(("accepted", "partially_accepted"))
    )
    latest_run = (
        select(CompletionOutcome.completion_id, func.max(CiRun.received_at).label("received_at"))
        .join(CiRun, CiRun.run_id == CompletionOutcome.run_id)
        .group_by(CompletionOutcome.completion_id)
        .subquery()
    )
    latest = (
        select(CompletionOutcome.completion_id, CompletionOutcome.status)
        .join(CiRun, CiRun.run_id == CompletionOutcome.run_id)
        .join(
            latest_run,
            and_(
                latest_run.c.completion_id == CompletionOutcome.completion_id,
                latest_run.c.received_at == CiRun.received_at,
            ),
        )
        .subquery()
    )
    query = (
        select(
            Completion.adapter,
            func.count(distinct(Completion.id)),
            func.count(distinct(case((Completion.id.in_(shown), Completion.id)))),
            func.count(distinct(case((Completion.id.in_(accepted), Completion.id)))),
            func.count(distinct(latest.c.completion_id)),
            func.count(distinct(case((latest.c.status == "passed", latest.c.completion_id)))),
        )
        .outerjoin(latest, latest.c.completion_id == Completion.id)
        .where(window)
        .group_by(Completion.adapter)
        .order_by(Completion.adapter)
    )
    return [AdapterStats(adapter, *counts) for adapter, *counts in session.execute(query)]
