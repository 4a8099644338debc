"""What the learning loop has done, counted from the database for ``GET /metrics``: rounds by
status and how long they took, the gate's decisions, and which adapter versions are live.

These are database-wide facts (the trainer runs elsewhere), so every replica reports the same
numbers; the per-request counters of :mod:`server.services.metrics` are the replica's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.store.models import Adapter, AdapterTransition, TrainingRound

__all__ = ["LIVE_STATES", "LoopCounts", "loop_counts"]

# Adapter states worth a time series; retired and rejected versions only ever accumulate.
LIVE_STATES = ("candidate", "evaluating", "approved", "canary", "active")


@dataclass(frozen=True)
class LoopCounts:
    rounds: dict[str, int]  # status -> rounds
    round_seconds: dict[str, float]  # status -> total seconds of its finished rounds
    gate_decisions: dict[str, int]  # "approved" | "rejected" -> decisions
    adapters: dict[str, str]  # name -> state, for versions in LIVE_STATES


def loop_counts(*, session: Session) -> LoopCounts:
    rounds: dict[str, int] = {}
    seconds: dict[str, float] = {}
    rows = session.execute(
        select(TrainingRound.status, TrainingRound.started_at, TrainingRound.finished_at)
    )
    for status, started, finished in rows:
        rounds[status] = rounds.get(status, 0) + 1
        if finished is not None and started is not None:
            seconds[status] = seconds.get(status, 0.0) + (finished - started).total_seconds()
    decisions = session.execute(
        select(AdapterTransition.to_state, func.count())
        .where(AdapterTransition.from_state == "evaluating")
        .where(AdapterTransition.to_state.in_(("approved", "rejected")))
        .group_by(AdapterTransition.to_state)
    )
    adapters = session.execute(
        select(Adapter.name, Adapter.state).where(Adapter.state.in_(LIVE_STATES))
    )
    return LoopCounts(
        rounds=rounds,
        round_seconds=seconds,
        gate_decisions={state: int(n) for state, n in decisions.tuples()},
        adapters={name: state for name, state in adapters.tuples()},
    )
