"""The rollout state (one row saying how traffic is split and what is paused) and the registry
moves that change it: :func:`promote`, :func:`rollback`, :func:`pin`.

A move is one transaction (``registry.atomic``): it changes adapter states, writes the audit
trail and updates the rollout state together, or (an error, a crash) changes nothing. The ops
API, the ``kaizen`` command, the canary judge and the trainer's round all move the registry
through these functions and nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from server.store import registry
from server.store.db import dialect_insert
from server.store.models import Adapter, RolloutState, utcnow

_ID = 1
SERVABLE = ("approved", "canary", "active", "retired")
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


def pinned_adapter(*, session: Session) -> Adapter | None:
    """The version ops pinned for everybody, if any."""
    state = get_rollout_state(session=session)
    return session.get(Adapter, state.pinned_adapter_id) if state.pinned_adapter_id else None


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


# -- moves ---------------------------------------------------------------------------------


class RolloutError(ValueError):
    """An ops request the registry cannot carry out (wrong state, unknown name, nothing to do)."""


def promote(*, session: Session, name: str, to: str, actor: str, reason: str = "") -> list[str]:
    """Make ``name`` the canary or the active version; returns what changed, in words.

    To ``canary``: it must be approved; a previous canary is retired. To ``active``: it must be
    approved or the canary; the previous active version is retired (a rollback restores it).
    One transaction: all of it happens, or (error, crash) none of it.
    """
    with registry.atomic(session):
        return _promote(session=session, name=name, to=to, actor=actor, reason=reason)


def rollback(*, session: Session, actor: str, reason: str = "") -> list[str]:
    """Take back the newest change: retire the canary if there is one; else retire the active
    version and restore the one that was active before it (or the base model). One
    transaction, like :func:`promote`."""
    with registry.atomic(session):
        return _rollback(session=session, actor=actor, reason=reason)


def _promote(*, session: Session, name: str, to: str, actor: str, reason: str) -> list[str]:
    if to not in ("canary", "active"):
        raise RolloutError(f"promote to 'canary' or 'active', not {to!r}")
    adapter = registry.require_adapter(session=session, name=name)
    changes: list[str] = []
    try:
        if to == "canary":
            registry.transition(
                session=session,
                adapter=adapter,
                to_state="canary",
                actor=actor,
                reason=reason or "promoted to canary",
            )
            old = [
                a
                for a in registry.list_adapters(session=session, states=["canary"])
                if a.id != adapter.id
            ]
            for a in old:
                registry.transition(
                    session=session,
                    adapter=a,
                    to_state="retired",
                    actor=actor,
                    reason=f"canary replaced by {name}",
                )
                changes.append(f"retired canary {a.name}")
            set_rollout_state(session=session, actor=actor, canary_started_at=datetime.now(UTC))
            changes.append(f"{name} is the canary")
            return changes
        was_canary = adapter.state == "canary"
        current = registry.active_adapter(session=session)
        registry.transition(
            session=session,
            adapter=adapter,
            to_state="active",
            actor=actor,
            reason=reason or "promoted to active",
        )
        fields: dict[str, Any] = {}
        if current is None or current.id != adapter.id:
            if current is not None:
                registry.transition(
                    session=session,
                    adapter=current,
                    to_state="retired",
                    actor=actor,
                    reason=f"replaced by {name}",
                )
                changes.append(f"retired {current.name}")
            history = get_rollout_state(session=session).active_history or []
            fields["active_history"] = [*history, current.id if current else None]
        if was_canary:
            fields["canary_started_at"] = None
        if fields:
            set_rollout_state(session=session, actor=actor, **fields)
        changes.append(f"{name} is active")
        return changes
    except registry.TransitionError as exc:
        raise RolloutError(str(exc)) from exc


def _rollback(*, session: Session, actor: str, reason: str) -> list[str]:
    canary = registry.canary_adapter(session=session)
    why = reason or "rolled back"
    if canary is not None:
        registry.transition(
            session=session, adapter=canary, to_state="retired", actor=actor, reason=why
        )
        set_rollout_state(session=session, actor=actor, canary_started_at=None)
        return [f"retired canary {canary.name}"]
    active = registry.active_adapter(session=session)
    if active is None:
        raise RolloutError("nothing to roll back: no canary and no active adapter")
    # What was active before this one: the top of the stack promotions push (skipping versions
    # that have since been moved elsewhere by hand); an empty stack means the base model.
    history = list(get_rollout_state(session=session).active_history or [])
    previous: Adapter | None = None
    while history:
        candidate_id = history.pop()
        if candidate_id is None:
            break
        found = session.get(Adapter, candidate_id)
        if found is not None and found.state == "retired" and found.id != active.id:
            previous = found
            break
    registry.transition(
        session=session, adapter=active, to_state="retired", actor=actor, reason=why
    )
    changes = [f"retired {active.name}"]
    if previous is not None:
        registry.transition(
            session=session,
            adapter=previous,
            to_state="active",
            actor=actor,
            reason=f"restored by rollback of {active.name}",
        )
        changes.append(f"{previous.name} is active again")
    else:
        changes.append("the base model serves")
    set_rollout_state(session=session, actor=actor, active_history=history)
    return changes


def pin(*, session: Session, name: str | None, actor: str) -> list[str]:
    """Serve ``name`` to everybody (no canary, no automatic moves) or, with None, unpin."""
    if name is None:
        set_rollout_state(session=session, actor=actor, pinned_adapter_id=None)
        return ["unpinned"]
    adapter = registry.require_adapter(session=session, name=name)
    if adapter.state not in SERVABLE:
        raise RolloutError(
            f"adapter {name} is {adapter.state}; only {', '.join(SERVABLE)} versions can be pinned"
        )
    set_rollout_state(session=session, actor=actor, pinned_adapter_id=adapter.id)
    return [f"pinned {name}"]
