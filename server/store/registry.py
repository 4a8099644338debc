"""The adapter registry: versions, their states and the audit trail of every state change.

States and the moves between them (``ALLOWED``)::

    candidate -> evaluating -> rejected | approved -> canary -> active -> retired

A rollback returns a retired version to ``active``; a canary that is rolled back is retired.
Every change writes an :class:`AdapterTransition` row saying who or what made it and why.
A move of several adapters (promote the canary, retire the old active one, update the rollout
state) runs in :func:`atomic`: one transaction, so a crash between its steps leaves the registry
as it was before the move, never half-moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.store.artifacts import Published
from server.store.models import Adapter, AdapterTransition, utcnow

STATES = ("candidate", "evaluating", "rejected", "approved", "canary", "active", "retired")
ALLOWED: dict[str, frozenset[str]] = {
    "candidate": frozenset({"evaluating", "rejected", "retired"}),
    "evaluating": frozenset({"approved", "rejected", "candidate"}),
    "approved": frozenset({"canary", "active", "retired"}),
    "canary": frozenset({"active", "retired"}),
    "active": frozenset({"retired"}),
    "retired": frozenset({"active"}),
    "rejected": frozenset(),
}


_ATOMIC = "kaizen_atomic"


@contextmanager
def atomic(session: Session) -> Iterator[Session]:
    """Run several registry writes as one transaction: inside, :func:`transition` and
    :func:`commit` only flush; the block's end commits all of them, an exception (or the
    process dying) keeps none. Nested blocks join the outermost one."""
    if session.info.get(_ATOMIC):
        yield session
        return
    session.info[_ATOMIC] = True
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.info.pop(_ATOMIC, None)


def commit(session: Session) -> None:
    """Commit, unless inside :func:`atomic` (then flush: the block commits)."""
    if session.info.get(_ATOMIC):
        session.flush()
    else:
        session.commit()


class TransitionError(ValueError):
    """A state change the registry does not allow."""


class AdapterExistsError(ValueError):
    """An adapter name that is taken: names are never reused for new weights."""


def register_adapter(
    *,
    session: Session,
    name: str,
    path: str,
    base_sha256: str,
    manifest: dict[str, Any],
    parent_id: int | None,
    round_id: int | None,
    actor: str,
    artifact: Published | None = None,
) -> Adapter:
    """Add a new version in state ``candidate``. ``artifact``: where it was published
    (:func:`server.store.artifacts.publish_adapter`), which replicas fetch it from."""
    if session.scalar(select(Adapter.id).where(Adapter.name == name)) is not None:
        raise AdapterExistsError(
            f"an adapter named {name!r} exists; every version needs a new name"
        )
    adapter = Adapter(
        name=name,
        state="candidate",
        path=path,
        uri=artifact.uri if artifact is not None else None,
        artifact_sha256=artifact.sha256 if artifact is not None else None,
        base_sha256=base_sha256,
        manifest=manifest,
        parent_id=parent_id,
        round_id=round_id,
    )
    session.add(adapter)
    session.flush()
    session.add(
        AdapterTransition(
            adapter_id=adapter.id,
            from_state=None,
            to_state="candidate",
            actor=actor,
            reason="registered",
        )
    )
    session.commit()
    return adapter


def transition(
    *, session: Session, adapter: Adapter, to_state: str, actor: str, reason: str = ""
) -> Adapter:
    """Move ``adapter`` to ``to_state`` (committed, or flushed inside :func:`atomic`), or
    raise :class:`TransitionError` (which, inside :func:`atomic`, undoes the whole block)."""
    if to_state not in STATES:
        raise TransitionError(f"unknown state {to_state!r}; states: {', '.join(STATES)}")
    if to_state not in ALLOWED[adapter.state]:
        allowed = ", ".join(sorted(ALLOWED[adapter.state])) or "none (final)"
        raise TransitionError(
            f"adapter {adapter.name} is {adapter.state}; it cannot become {to_state} "
            f"(allowed from {adapter.state}: {allowed})"
        )
    # Compare-and-set: of two replicas deciding at once, exactly one moves the adapter.
    from_state, now = adapter.state, utcnow()
    moved = session.execute(
        update(Adapter)
        .where(Adapter.id == adapter.id, Adapter.state == from_state)
        .values(state=to_state, updated_at=now)
    ).rowcount
    if not moved:
        session.rollback()
        raise TransitionError(
            f"adapter {adapter.name} changed state meanwhile (it is no longer {from_state}); "
            "look again and retry"
        )
    session.add(
        AdapterTransition(
            adapter_id=adapter.id,
            from_state=from_state,
            to_state=to_state,
            actor=actor,
            reason=reason,
        )
    )
    commit(session)
    session.refresh(adapter)
    return adapter


def get_adapter(*, session: Session, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.name == name))


def require_adapter(*, session: Session, name: str) -> Adapter:
    """The adapter called ``name``; LookupError, saying where to look, if there is none."""
    adapter = get_adapter(session=session, name=name)
    if adapter is None:
        raise LookupError(f"no adapter named {name!r}; `kaizen adapters list` shows them")
    return adapter


def list_adapters(*, session: Session, states: Iterable[str] | None = None) -> list[Adapter]:
    query = select(Adapter).order_by(Adapter.id)
    if states is not None:
        query = query.where(Adapter.state.in_(list(states)))
    return list(session.scalars(query))


def active_adapter(*, session: Session) -> Adapter | None:
    """The version serving by default (the newest, should several ever be marked active)."""
    return session.scalar(
        select(Adapter).where(Adapter.state == "active").order_by(Adapter.id.desc()).limit(1)
    )


def history(*, session: Session, adapter_id: int) -> list[AdapterTransition]:
    return list(
        session.scalars(
            select(AdapterTransition)
            .where(AdapterTransition.adapter_id == adapter_id)
            .order_by(AdapterTransition.id)
        )
    )


def canary_adapter(*, session: Session) -> Adapter | None:
    return session.scalar(
        select(Adapter).where(Adapter.state == "canary").order_by(Adapter.id.desc()).limit(1)
    )
