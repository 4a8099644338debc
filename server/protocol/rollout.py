"""Request and response models of the registry and rollout API (role ``ops``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransitionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_state: str | None
    to_state: str
    actor: str
    reason: str
    at: datetime


class OnlineStats(BaseModel):
    completions: int = 0
    shown: int = 0
    accepted: int = 0
    acceptance_rate: float | None = None
    with_outcome: int = 0
    passed: int = 0
    ci_pass_rate: float | None = None


class AdapterOut(BaseModel):
    name: str
    state: str
    parent: str | None
    round_id: int | None
    path: str
    base_sha256: str
    created_at: datetime
    updated_at: datetime
    evaluation: dict[str, Any] | None
    online: OnlineStats
    loaded_here: bool


class AdapterDetailOut(AdapterOut):
    manifest: dict[str, Any]
    history: list[TransitionOut]


class AdapterList(BaseModel):
    data: list[AdapterOut]
    count: int


class PromoteRequest(_Strict):
    to: Literal["canary", "active"]
    reason: str = Field("", max_length=2000)


class RollbackRequest(_Strict):
    reason: str = Field("", max_length=2000)


class RolloutUpdate(_Strict):
    """Only the fields sent change; ``pinned: null`` unpins."""

    canary_share: float | None = Field(None, ge=0.0, le=1.0)
    auto_rollout: bool | None = None
    training_paused: bool | None = None
    pinned: str | None = Field(None, max_length=200)


class RolloutOut(BaseModel):
    active: str | None
    canary: str | None
    pinned: str | None
    canary_share: float
    auto_rollout: bool
    training_paused: bool
    canary_started_at: datetime | None
    updated_at: datetime
    updated_by: str
    # What this replica routes to now (replicas converge within KAIZEN_ROLLOUT_POLL_SECONDS).
    replica: dict[str, Any]


class RolloutChange(BaseModel):
    changes: list[str]
    rollout: RolloutOut
