"""Response models of the ops dashboard's data (``GET /v1/dashboard``) and of the training
rounds (``GET /v1/rounds``), role ``ops``."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel


class DailyPoint(BaseModel):
    day: date
    completions: int
    shown: int
    accepted: int
    acceptance_rate: float | None
    judged: int  # CI verdicts on the model's own text
    passed: int
    developer_fixes: int  # passes after the developer changed the text: not in the rate
    ci_pass_rate: float | None


class AdapterSeries(BaseModel):
    adapter: str | None  # None: the base model
    label: str
    points: list[DailyPoint]


class RolloutEventOut(BaseModel):
    at: datetime
    adapter: str
    kind: str  # canary_started | promoted | rolled_back | restored
    from_state: str | None
    to_state: str
    actor: str
    reason: str


class SuiteBound(BaseModel):
    suite: str
    problems: int
    gain_points: float | None
    lower_points: float | None  # the one-sided lower confidence bound of the gain
    level: float | None
    judged: bool | None  # non-inferiority applied (enough tasks)
    baseline_pass: float | None
    candidate_pass: float | None


class GateOut(BaseModel):
    decision: str
    baseline: str | None
    reasons: list[str]
    pooled: SuiteBound | None
    suites: list[SuiteBound]


class FunnelStep(BaseModel):
    label: str
    count: int | None


class RoundOut(BaseModel):
    id: int
    status: str
    trigger: str
    started_at: datetime
    finished_at: datetime | None
    parent: str | None
    adapter: str | None
    funnel_steps: list[FunnelStep]  # records -> verdicts -> pairs -> selected -> trained
    pairs_by_source: dict[str, int]
    gate: GateOut | None  # the adapter's evaluation, when the round's candidate was gated
    gate_changes: list[str]  # what the round's gate stage did to the registry
    funnel: dict[str, Any]  # the round's whole funnel, as stored
    metrics: dict[str, Any]
    durations: dict[str, Any]
    alarms: list[Any]
    error: str | None


class RoundList(BaseModel):
    data: list[RoundOut]
    count: int


class CanarySide(BaseModel):
    adapter: str | None
    shown: int
    accepted: int
    acceptance_rate: float | None
    judged: int
    passed: int
    ci_pass_rate: float | None
    developer_fixes: int


class CanaryOut(BaseModel):
    canary: str
    active: str | None
    started_at: datetime
    hours: float
    share: float
    auto_rollout: bool
    canary_side: CanarySide
    active_side: CanarySide
    action: str  # what the judge's rule says now: wait | promote | rollback
    reason: str


class LineageNode(BaseModel):
    name: str
    state: str
    parent: str | None
    round_id: int | None
    created_at: datetime
    gate_decision: str | None


class DashboardOut(BaseModel):
    since: datetime
    until: datetime
    series: list[AdapterSeries]
    events: list[RolloutEventOut]
    rounds: list[RoundOut]
    canary: CanaryOut | None
    lineage: list[LineageNode]
