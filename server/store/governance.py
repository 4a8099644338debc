"""Governance of training data: repositories excluded from training, and the retention window.

An excluded repository's records stay in the database (the server still serves and records
its completions) but no round turns them into pairs; the next round reads the list when it
starts. Retention removes what users sent: completions with their choices, IDE events, ledger
entries and CI outcomes, and CI runs (with the logs and raw reports they carry), older than the
window. Adapters, their manifests (which name record ids, not their text) and rounds are kept:
they are the audit trail of what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from server.store.models import (
    CiRun,
    Completion,
    CompletionEvent,
    CompletionOutcome,
    ExcludedRepository,
    LedgerEntry,
    RecordedChoice,
    utcnow,
)
from server.store.repositories import normalise_repository

__all__ = [
    "PruneResult",
    "exclude_repository",
    "excluded_repositories",
    "include_repository",
    "list_excluded",
    "prune_records",
]


def exclude_repository(
    *, session: Session, repository: str, actor: str, reason: str = ""
) -> ExcludedRepository:
    """Exclude ``repository`` (a clone URL or ``host/owner/name``) from training; excluding it
    again keeps the first entry. Raises ValueError for a name that is no repository."""
    name = normalise_repository(repository)
    row = session.get(ExcludedRepository, name)
    if row is None:
        row = ExcludedRepository(repository=name, excluded_by=actor, reason=reason)
        session.add(row)
        session.commit()
    return row


def include_repository(*, session: Session, repository: str) -> bool:
    """Let ``repository`` train again; False when it was not excluded."""
    row = session.get(ExcludedRepository, normalise_repository(repository))
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def list_excluded(*, session: Session) -> list[ExcludedRepository]:
    return list(session.scalars(select(ExcludedRepository).order_by(ExcludedRepository.repository)))


def excluded_repositories(*, session: Session) -> frozenset[str]:
    """The excluded repositories' names, as a round filters records by them."""
    return frozenset(session.scalars(select(ExcludedRepository.repository)))


@dataclass(frozen=True)
class PruneResult:
    cutoff: datetime
    completions: int
    ci_runs: int
    outcomes: int

    @property
    def total(self) -> int:
        return self.completions + self.ci_runs + self.outcomes


def prune_records(
    *, session: Session, retention_days: float, now: datetime | None = None
) -> PruneResult:
    """Delete records older than ``retention_days``: completions created before the cut-off
    (with their choices, events, ledger entries and outcomes) and CI runs received before it
    (with their outcomes). Children are deleted explicitly, not left to ``ON DELETE CASCADE``,
    which SQLite honours only with foreign keys switched on."""
    if retention_days <= 0:
        raise ValueError(f"retention_days must be positive: {retention_days}")
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    old_completions = select(Completion.id).where(Completion.created_at < cutoff)
    old_runs = select(CiRun.id).where(CiRun.received_at < cutoff)
    outcomes = session.execute(
        delete(CompletionOutcome).where(
            or_(
                CompletionOutcome.completion_id.in_(old_completions),
                CompletionOutcome.ci_run_id.in_(old_runs),
            )
        )
    ).rowcount
    for child in (RecordedChoice, CompletionEvent, LedgerEntry):
        session.execute(delete(child).where(child.completion_id.in_(old_completions)))
    completions = session.execute(delete(Completion).where(Completion.created_at < cutoff)).rowcount
    runs = session.execute(delete(CiRun).where(CiRun.received_at < cutoff)).rowcount
    session.commit()
    return PruneResult(cutoff=cutoff, completions=completions, ci_runs=runs, outcomes=outcomes)
