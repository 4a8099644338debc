"""The adapter registry: the allowed moves, names never reused, the audit trail, and the
compare-and-set that lets only one of two concurrent deciders move an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.store import adapters as registry
from tests.utils.adapters import approved_adapter


def test_moves_follow_the_state_machine(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    adapter = approved_adapter(session_factory, tmp_path, "v1")
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="v1")
        assert adapter is not None
        with pytest.raises(registry.TransitionError, match="cannot become candidate"):
            registry.transition(session=session, adapter=adapter, to_state="candidate", actor="t")
        with pytest.raises(registry.TransitionError, match="unknown state"):
            registry.transition(session=session, adapter=adapter, to_state="shiny", actor="t")
        for state in ("canary", "active", "retired", "active"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="t")
        trail = registry.history(session=session, adapter_id=adapter.id)
        assert [(t.from_state, t.to_state) for t in trail][-4:] == [
            ("approved", "canary"),
            ("canary", "active"),
            ("active", "retired"),
            ("retired", "active"),
        ]


def test_rejected_is_final_and_names_are_never_reused(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    approved_adapter(session_factory, tmp_path, "v1")
    with session_factory() as session:
        with pytest.raises(registry.AdapterExistsError, match="needs a new name"):
            registry.register_adapter(
                session=session,
                name="v1",
                path="/x",
                base_sha256="0" * 64,
                manifest={},
                parent_id=None,
                round_id=None,
                actor="t",
            )
        fresh = registry.register_adapter(
            session=session,
            name="v2",
            path="/y",
            base_sha256="0" * 64,
            manifest={},
            parent_id=None,
            round_id=None,
            actor="t",
        )
        registry.transition(session=session, adapter=fresh, to_state="rejected", actor="gate")
        with pytest.raises(registry.TransitionError, match="none \\(final\\)"):
            registry.transition(session=session, adapter=fresh, to_state="approved", actor="t")


def test_only_one_of_two_concurrent_moves_happens(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    approved_adapter(session_factory, tmp_path, "v1")
    with session_factory() as first, session_factory() as second:
        a = registry.get_adapter(session=first, name="v1")
        b = registry.get_adapter(session=second, name="v1")
        assert a is not None and b is not None and a.state == b.state == "approved"
        registry.transition(session=first, adapter=a, to_state="active", actor="replica-a")
        with pytest.raises(registry.TransitionError, match="changed state meanwhile"):
            registry.transition(session=second, adapter=b, to_state="canary", actor="replica-b")
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="v1")
        assert adapter is not None and adapter.state == "active"
        actors = [t.actor for t in registry.history(session=session, adapter_id=adapter.id)]
        assert "replica-b" not in actors
