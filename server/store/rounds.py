"""Training rounds: what the trainer's worker records about each round, and what it asks to
decide when the next one is due."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.store.models import CiRun, CompletionOutcome, TrainingRound, utcnow

VERDICTS = ("passed", "failed", "build_failed")  # "error" says nothing about the code


def start_round(
    *,
    session: Session,
    trigger: str,
    records_until: datetime,
    parent_adapter_id: int | None,
    work_dir: str,
    config: dict[str, Any],
) -> TrainingRound:
    row = TrainingRound(
        status="running",
        trigger=trigger,
        records_until=records_until,
        parent_adapter_id=parent_adapter_id,
        work_dir=work_dir,
        config=config,
        funnel={},
        metrics={},
        durations={},
        alarms=[],
    )
    session.add(row)
    session.commit()
    return row


def update_round(*, session: Session, round_id: int, **fields: Any) -> TrainingRound:
    """Set ``fields`` on a round (``status`` other than running also sets ``finished_at``)."""
    row = session.get(TrainingRound, round_id)
    if row is None:
        raise LookupError(f"no training round {round_id}")
    for name, value in fields.items():
        if not hasattr(row, name):
            raise AttributeError(f"training rounds have no field {name!r}")
        setattr(row, name, value)
    if fields.get("status", "running") != "running":
        row.finished_at = utcnow()
    session.commit()
    return row


def get_round(*, session: Session, round_id: int) -> TrainingRound | None:
    return session.get(TrainingRound, round_id)


def list_rounds(*, session: Session, limit: int = 50) -> list[TrainingRound]:
    return list(
        session.scalars(select(TrainingRound).order_by(TrainingRound.id.desc()).limit(limit))
    )


def unfinished_rounds(*, session: Session) -> list[TrainingRound]:
    """Rounds still marked running: in progress elsewhere, or killed (then resumable)."""
    return list(
        session.scalars(
            select(TrainingRound)
            .where(TrainingRound.status == "running")
            .order_by(TrainingRound.id)
        )
    )


def last_round(*, session: Session) -> TrainingRound | None:
    """The newest round that finished, whatever its result."""
    return session.scalar(
        select(TrainingRound)
        .where(TrainingRound.status != "running")
        .order_by(TrainingRound.id.desc())
        .limit(1)
    )


def count_verdicts(
    *, session: Session, after: datetime | None = None, until: datetime | None = None
) -> int:
    """Outcomes with a verdict on the code whose CI run arrived in (after, until]."""
    query = (
        select(func.count())
        .select_from(CompletionOutcome)
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
        .where(CompletionOutcome.status.in_(VERDICTS))
    )
    if after is not None:
        query = query.where(CiRun.received_at > after)
    if until is not None:
        query = query.where(CiRun.received_at <= until)
    return session.scalar(query) or 0
