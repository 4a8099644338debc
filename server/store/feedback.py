"""Feedback on completions: IDE events, the ledger of accepted completions, CI runs and outcomes.

Writes are idempotent and safe with several replicas on one database: duplicates are detected
by primary key with ``INSERT ... ON CONFLICT`` (SQLite and PostgreSQL both support it).

Every write is checked against the completion's *served* record (the token that received it and
the IDE context's repository at completion time), never against what the report says: an
``ide`` token writes only for its owner's completions, a scoped ``ci`` token only for
completions served in its repositories. Refused items are listed, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, distinct, func, select
from sqlalchemy.orm import Session

from server.store import signals
from server.store.db import dialect_insert
from server.store.models import (
    ApiToken,
    CiRun,
    Completion,
    CompletionEvent,
    CompletionOutcome,
    LedgerEntry,
    utcnow,
)
from server.store.repositories import normalise_repository, normalised_or_none
from server.store.tokens import Principal, Role

# Why an item was not stored (plugins/PROTOCOL.md, "Refusals").
NOT_OWNER = "not_owner"  # an ide token, and another owner's completion
NOT_IN_SCOPE = "repository_not_in_scope"  # a scoped ci token, served in another repository
REPOSITORY_MISMATCH = "repository_mismatch"  # a ledger entry moved off its served repository
STALE = "stale"  # a ledger update older than the stored one


@dataclass(frozen=True)
class Served:
    """What the server recorded when it served a completion."""

    token_id: int | None
    owner: str | None  # the receiving token's name
    repository: str | None  # the IDE context's repository, as the client sent it
    adapter: str | None = None  # the version that served it (None: the base model)


@dataclass(frozen=True)
class Refusal:
    completion_id: str
    choice_index: int
    reason: str


def served_records(*, session: Session, ids: Iterable[str]) -> dict[str, Served]:
    """The served record of each known completion among ``ids``."""
    wanted = set(ids)
    if not wanted:
        return {}
    rows = session.execute(
        select(
            Completion.id,
            Completion.token_id,
            ApiToken.name,
            Completion.repository,
            Completion.adapter,
        )
        .outerjoin(ApiToken, ApiToken.id == Completion.token_id)
        .where(Completion.id.in_(wanted))
    )
    return {cid: Served(token, owner, repo, adapter) for cid, token, owner, repo, adapter in rows}


def known_completion_ids(*, session: Session, ids: Iterable[str]) -> set[str]:
    return set(served_records(session=session, ids=ids))


def refusal_reason(principal: Principal | None, served: Served) -> str | None:
    """Why ``principal`` may not write feedback on this completion, or ``None`` if it may
    (``None`` for a trusted in-process writer: the trainer's tests, the simulator)."""
    if principal is None or principal.role is Role.OPS:
        return None
    if principal.role is Role.IDE:
        owned = principal.owns(token_id=served.token_id, owner=served.owner)
        return None if owned else NOT_OWNER
    return None if principal.covers(served.repository) else NOT_IN_SCOPE


def _refusals(
    items: Sequence[dict[str, Any]], served: dict[str, Served], principal: Principal | None
) -> tuple[list[dict[str, Any]], list[Refusal]]:
    """Split the items of known completions into those ``principal`` may write and the
    refusals (one per completion and choice)."""
    allowed: list[dict[str, Any]] = []
    refused: dict[tuple[str, int], Refusal] = {}
    for item in items:
        record = served.get(item["completion_id"])
        if record is None:
            continue
        reason = refusal_reason(principal, record)
        if reason is None:
            allowed.append(item)
        else:
            key = (item["completion_id"], item.get("choice_index", 0))
            refused.setdefault(key, Refusal(*key, reason))
    return allowed, list(refused.values())


@dataclass
class EventsResult:
    stored: int = 0
    duplicates: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    # Stored events by (type, the adapter that served the completion; None: the base model).
    stored_by: Counter[tuple[str, str | None]] = field(default_factory=Counter)


def save_events(
    *,
    session: Session,
    events: Sequence[dict[str, Any]],
    token_id: int | None,
    principal: Principal | None = None,
) -> EventsResult:
    """Store events of known completions that ``principal`` may write (``None``: no checks),
    once each (by event id), as sent by ``token_id``; report the rest."""
    served = served_records(session=session, ids=(e["completion_id"] for e in events))
    ours, refused = _refusals(events, served, principal)
    result = EventsResult(
        unknown_completion_ids=sorted({e["completion_id"] for e in events} - served.keys()),
        refused=refused,
    )
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
        result.stored_by.update((e["type"], served[e["completion_id"]].adapter) for e in new)
        result.duplicates = len(ours) - len(new)
    return result


@dataclass
class LedgerResult:
    stored: int = 0
    duplicates: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


def upsert_ledger(
    *,
    session: Session,
    entries: Sequence[dict[str, Any]],
    principal: Principal | None = None,
    received_at: datetime | None = None,
) -> LedgerResult:
    """Insert or update entries by (completion id, choice); an older update never wins.

    ``updated_at`` is clamped to ``received_at`` (the server's clock): a client cannot stamp an
    entry in the future and so lock out its later updates. An update that loses to the stored
    one is refused as ``stale``; one equal to it (a retried batch) counts as a duplicate.
    """
    served = served_records(session=session, ids=(e["completion_id"] for e in entries))
    allowed, refused = _refusals(entries, served, principal)
    result = LedgerResult(
        unknown_completion_ids=sorted({e["completion_id"] for e in entries} - served.keys()),
        refused=refused,
    )
    received_at = received_at or utcnow()
    table = LedgerEntry.__table__
    for entry in allowed:
        key = (entry["completion_id"], entry["choice_index"])
        record = served[entry["completion_id"]]
        checked = principal is not None and principal.role is not Role.OPS
        if (
            checked
            and record.repository is not None
            and (normalised_or_none(record.repository) != normalised_or_none(entry["repository"]))
        ):
            result.refused.append(Refusal(*key, REPOSITORY_MISMATCH))
            continue
        row = {
            **entry,
            "updated_at": min(entry["updated_at"], received_at),
            "received_at": received_at,
        }
        stmt = dialect_insert(session, table).values(**row)
        updatable = {k: stmt.excluded[k] for k in row if k not in ("completion_id", "choice_index")}
        stmt = stmt.on_conflict_do_update(
            index_elements=["completion_id", "choice_index"],
            set_=updatable,
            where=table.c.updated_at < stmt.excluded.updated_at,
        )
        if session.execute(stmt).rowcount:
            result.stored += 1
            continue
        stored_at = session.scalar(
            select(LedgerEntry.updated_at).where(
                LedgerEntry.completion_id == key[0], LedgerEntry.choice_index == key[1]
            )
        )
        if stored_at == row["updated_at"]:
            result.duplicates += 1
        else:
            result.refused.append(Refusal(*key, STALE))
    session.commit()
    return result


def active_ledger(
    *,
    session: Session,
    repository: str,
    since: datetime,
    principal: Principal | None = None,
    limit: int = 5000,
) -> list[LedgerEntry]:
    """Active entries of ``repository`` (normalised by the caller) updated since ``since``.

    For a scoped ``ci`` token, only entries whose completion was *served* in one of its
    repositories: it could not report on the others anyway.
    """
    query = (
        select(LedgerEntry, Completion.repository)
        .join(Completion, Completion.id == LedgerEntry.completion_id)
        .where(
            LedgerEntry.repository == repository,
            LedgerEntry.state == "active",
            LedgerEntry.updated_at >= since,
        )
        .order_by(LedgerEntry.updated_at.desc())
        .limit(limit)
    )
    return [
        entry
        for entry, served_repository in session.execute(query)
        if principal is None or principal.covers(served_repository)
    ]


@dataclass
class OutcomeResult:
    duplicate: bool = False
    completions: int = 0
    unknown_completion_ids: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    # Stored verdicts by (status, the adapter that served the completion; None: the base).
    stored_by: Counter[tuple[str, str | None]] = field(default_factory=Counter)


def save_outcome(
    *,
    session: Session,
    run: dict[str, Any],
    completions: Sequence[dict[str, Any]],
    raw: dict[str, Any],
    token_id: int | None,
    principal: Principal | None = None,
    executability: Sequence[dict[str, Any]] = (),
) -> OutcomeResult:
    """Store a CI run once (by repository and run id), as sent by ``token_id``, with its
    attribution to the known completions that ``principal`` may report on (``None``: no checks)
    and the executability of those no test exercised (under the same rule)."""
    served = served_records(
        session=session,
        ids=[c["completion_id"] for c in completions] + [e["completion_id"] for e in executability],
    )
    allowed, refused = _refusals(completions, served, principal)
    checked, refused_checks = _refusals(executability, served, principal)
    refused += [r for r in refused_checks if r not in refused]
    result = OutcomeResult(
        unknown_completion_ids=sorted(
            {c["completion_id"] for c in [*completions, *executability]} - served.keys()
        ),
        refused=refused,
    )
    try:
        repository_key = normalise_repository(run["repository"])
    except ValueError:
        repository_key = run["repository"]
    ci_run_id = session.execute(
        dialect_insert(session, CiRun.__table__)
        .values(**run, repository_key=repository_key, raw=raw, token_id=token_id)
        .on_conflict_do_nothing()  # (repository, run id) seen: a retry of the same report
        .returning(CiRun.__table__.c.id)
    ).scalar()
    if ci_run_id is None:
        session.rollback()
        result.duplicate = True
        return result
    rows = [{**c, "ci_run_id": ci_run_id, "run_id": run["run_id"]} for c in allowed]
    if rows:
        session.execute(
            dialect_insert(session, CompletionOutcome.__table__)
            .values(rows)
            .on_conflict_do_nothing()
        )
    session.commit()
    result.completions = len(rows)
    result.stored_by.update((c["status"], served[c["completion_id"]].adapter) for c in rows)
    for item in checked:  # never a verdict: the trainer reads outcomes first
        signals.record_executability(
            session=session,
            completion_id=item["completion_id"],
            choice_index=item.get("choice_index", 0),
            text=item["final_text"],
            result=item,
            checked_in="ci",
        )
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
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
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
    # Served completions only: exploration's alternatives (source "resample") are no traffic.
    window = and_(
        Completion.created_at >= since, Completion.created_at < until, Completion.source == "serve"
    )
    shown = select(distinct(CompletionEvent.completion_id)).where(
        CompletionEvent.type.in_(("shown", "accepted", "partially_accepted", "rejected", "edited"))
    )
    accepted = select(distinct(CompletionEvent.completion_id)).where(
        CompletionEvent.type.in_(("accepted", "partially_accepted"))
    )
    latest_run = (
        select(CompletionOutcome.completion_id, func.max(CiRun.received_at).label("received_at"))
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
        .group_by(CompletionOutcome.completion_id)
        .subquery()
    )
    latest = (
        select(CompletionOutcome.completion_id, CompletionOutcome.status)
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
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
