"""The ops dashboard's data: per adapter version and day, acceptance and CI pass rates with the
rollout events; each training round's funnel and gate result; the canary's live comparison (the
judge's own counts and rule, applied now); and every version's lineage. Read in a worker
thread, one session per call."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.protocol.dashboard import (
    AdapterSeries,
    CanaryOut,
    CanarySide,
    DailyPoint,
    DashboardOut,
    FunnelStep,
    GateOut,
    LineageNode,
    RolloutEventOut,
    RoundList,
    RoundOut,
    SuiteBound,
)
from server.services.canary_judge import compare_canary
from server.store import registry
from server.store.canary import CanaryCounts
from server.store.dashboard import daily_rates, rollout_events
from server.store.models import Adapter, TrainingRound
from server.store.rollout import get_rollout_state
from server.store.rounds import list_rounds

BASE_LABEL = "base model"


@dataclass
class DashboardService:
    session_factory: sessionmaker[Session]
    settings: Settings

    async def overview(self, *, days: int = 30, now: datetime | None = None) -> DashboardOut:
        return await asyncio.to_thread(self._overview, days, now or datetime.now(UTC))

    async def rounds(self, *, limit: int = 50) -> RoundList:
        def read() -> RoundList:
            with self.session_factory() as session:
                rows = self._rounds(session, limit)
                return RoundList(data=rows, count=len(rows))

        return await asyncio.to_thread(read)

    def _overview(self, days: int, now: datetime) -> DashboardOut:
        # Whole UTC days, so the first bucket is not a partial day.
        since = datetime.combine(now.date() - timedelta(days=days - 1), datetime.min.time(), UTC)
        with self.session_factory() as session:
            series: dict[str | None, list[DailyPoint]] = {}
            for r in daily_rates(session=session, since=since, until=now):
                series.setdefault(r.adapter, []).append(
                    DailyPoint(
                        **{k: v for k, v in asdict(r).items() if k != "adapter"},
                        acceptance_rate=r.acceptance_rate,
                        ci_pass_rate=r.ci_pass_rate,
                    )
                )
            adapters = registry.list_adapters(session=session)
            return DashboardOut(
                since=since,
                until=now,
                series=[
                    AdapterSeries(adapter=name, label=name or BASE_LABEL, points=points)
                    for name, points in series.items()
                ],
                events=[
                    RolloutEventOut(**asdict(e))
                    for e in rollout_events(session=session, since=since, until=now)
                ],
                rounds=self._rounds(session, 20),
                canary=self._canary(session, now),
                lineage=[_lineage(session, a) for a in adapters],
            )

    def _rounds(self, session: Session, limit: int) -> list[RoundOut]:
        return [_round(session, row) for row in list_rounds(session=session, limit=limit)]

    def _canary(self, session: Session, now: datetime) -> CanaryOut | None:
        comparison = compare_canary(session=session, settings=self.settings, now=now)
        if comparison is None:
            return None
        state = get_rollout_state(session=session)
        return CanaryOut(
            canary=comparison.canary.name,
            active=comparison.active_name,
            started_at=comparison.since,
            hours=round(comparison.hours, 3),
            share=state.canary_share,
            auto_rollout=state.auto_rollout,
            canary_side=_side(comparison.new),
            active_side=_side(comparison.old),
            action=str(comparison.result.action),
            reason=comparison.result.reason,
        )


def _side(c: CanaryCounts) -> CanarySide:
    return CanarySide(
        adapter=c.adapter,
        shown=c.shown,
        accepted=c.accepted,
        acceptance_rate=c.accepted / c.shown if c.shown else None,
        judged=c.judged,
        passed=c.passed,
        ci_pass_rate=c.passed / c.judged if c.judged else None,
        developer_fixes=c.developer_fixes,
    )


def _name(session: Session, adapter_id: int | None) -> str | None:
    adapter = session.get(Adapter, adapter_id) if adapter_id else None
    return adapter.name if adapter else None


def _lineage(session: Session, adapter: Adapter) -> LineageNode:
    return LineageNode(
        name=adapter.name,
        state=adapter.state,
        parent=_name(session, adapter.parent_id),
        round_id=adapter.round_id,
        created_at=adapter.created_at,
        gate_decision=(adapter.evaluation or {}).get("decision"),
    )


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def funnel_steps(funnel: dict[str, Any]) -> list[FunnelStep]:
    """records -> verdicts -> pairs -> selected -> trained, from a round's stored funnel (a
    stage the round never reached is None)."""
    pairs = funnel.get("pairs") or {}
    selection = funnel.get("selection") or {}
    return [
        FunnelStep(label="records", count=_int(funnel.get("outcome_records"))),
        FunnelStep(label="verdicts", count=_int(funnel.get("records_with_verdict"))),
        FunnelStep(label="pairs", count=_int(pairs.get("pairs"))),
        FunnelStep(label="selected", count=_int(selection.get("selected"))),
        FunnelStep(label="trained", count=_int(funnel.get("trained_pairs"))),
    ]


def _bound(suite: str, bound: dict[str, Any], rates: dict[str, Any] | None) -> SuiteBound:
    return SuiteBound(
        suite=suite,
        problems=int(bound.get("problems") or 0),
        gain_points=bound.get("gain_points"),
        lower_points=bound.get("lower_points"),
        level=bound.get("level"),
        judged=bound.get("judged"),
        baseline_pass=(rates or {}).get("baseline"),
        candidate_pass=(rates or {}).get("candidate"),
    )


def gate_out(evaluation: dict[str, Any] | None) -> GateOut | None:
    """The gate's result as stored on the adapter (``trainer/gate.py``), per suite."""
    if not evaluation or "decision" not in evaluation:
        return None
    rates = evaluation.get("pass_rates") or {}
    pooled = evaluation.get("pooled")
    return GateOut(
        decision=evaluation["decision"],
        baseline=evaluation.get("baseline"),
        reasons=list(evaluation.get("reasons") or []),
        pooled=_bound("pooled", pooled, None) if isinstance(pooled, dict) else None,
        suites=[
            _bound(name, bound, rates.get(name))
            for name, bound in (evaluation.get("bounds") or {}).items()
        ],
    )


def _round(session: Session, row: TrainingRound) -> RoundOut:
    funnel = row.funnel or {}
    adapter = session.get(Adapter, row.adapter_id) if row.adapter_id else None
    by_source = (funnel.get("pairs") or {}).get("pairs_by_source") or {}
    return RoundOut(
        id=row.id,
        status=row.status,
        trigger=row.trigger,
        started_at=row.started_at,
        finished_at=row.finished_at,
        parent=_name(session, row.parent_adapter_id),
        adapter=adapter.name if adapter else None,
        funnel_steps=funnel_steps(funnel),
        pairs_by_source={str(k): int(v) for k, v in by_source.items()},
        gate=gate_out(adapter.evaluation if adapter else None),
        gate_changes=[str(c) for c in (funnel.get("gate") or {}).get("changes") or []],
        funnel=funnel,
        metrics=row.metrics or {},
        durations=row.durations or {},
        alarms=list(row.alarms or []),
        error=row.error,
    )
