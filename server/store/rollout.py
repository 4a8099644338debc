"""The rollout state: one row saying how traffic is split and what is paused."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from server.store import adapters as registry
from server.store.db import dialect_insert
from server.store.models import RolloutState, utcnow

_ID = 1
FIELDS = (
    "canary_share",
    "auto_rollout",
    "training_paused",
    "pinned_adapter_id",
    "canary_started_at",
    "active_history",
)


def get_rollout_state(*, session: Session) -> RolloutState:
    """The state row, created with the defaults the first time (safe with several replicas)."""
    state = session.get(RolloutState, _ID)
    if state is None:
        session.execute(
            dialect_insert(session, RolloutState.__table__)
            .values(
                id=_ID,
                canary_share=0.1,
                auto_rollout=True,
                training_paused=False,
                active_history=[],
                updated_at=utcnow(),
                updated_by="default",
            )
            .on_conflict_do_nothing()
        )
        registry.commit(session)
        state = session.get(RolloutState, _ID)
        assert state is not None
    return state


def set_rollout_state(*, session: Session, actor: str, **fields: Any) -> RolloutState:
    """Change some of :data:`FIELDS` (committed, or flushed inside ``registry.atomic``)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown rollout fields {sorted(unknown)}; known: {', '.join(FIELDS)}")
    if "canary_share" in fields and not 0.0 <= fields["canary_share"] <= 1.0:
        raise ValueError(f"canary_share must be in [0, 1], got {fields['canary_share']}")
    state = get_rollout_state(session=session)
    for name, value in fields.items():
        setattr(state, name, value)
    state.updated_at = utcnow()
    state.updated_by = actor
    registry.commit(session)  # flushed only inside registry.atomic(): part of that move
    return state
