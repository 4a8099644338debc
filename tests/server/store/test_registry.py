"""The adapter registry: the allowed moves, names never reused, the audit trail, and the
compare-and-set that lets only one of two concurrent deciders move an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
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


# -- atomic moves: a process killed between the steps of a move leaves no half-move ------------

# Runs a promote or rollback in a child process that SIGKILLs itself right after the
# ``kill_after``-th registry transition returned (0: never): the moves before it were made and,
# without one transaction around the whole operation, committed.
CHILD = """
import os, signal, sys
from server.store import rollout
from server.store import registry
from server.store.db import make_engine, make_session_factory

url, kill_after, op, name, to = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
real, calls = registry.transition, [0]

def dying(**kw):
    out = real(**kw)
    calls[0] += 1
    if calls[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

registry.transition = dying
with make_session_factory(make_engine(url))() as session:
    if op == "promote":
        rollout.promote(session=session, name=name, to=to, actor="ops")
    else:
        rollout.rollback(session=session, actor="ops")
"""


def _snapshot(factory: sessionmaker[Session]) -> tuple[object, ...]:
    from server.store.rollout import get_rollout_state

    with factory() as session:
        states = {a.name: a.state for a in registry.list_adapters(session=session)}
        trail = sum(
            len(registry.history(session=session, adapter_id=a.id))
            for a in registry.list_adapters(session=session)
        )
        rollout = get_rollout_state(session=session)
        return states, trail, list(rollout.active_history or []), rollout.canary_started_at


def _run_child(db_url: str, kill_after: int, *args: str) -> int:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    return subprocess.run(
        [sys.executable, "-c", CHILD, db_url, str(kill_after), *args], cwd=root, timeout=120
    ).returncode


@pytest.mark.parametrize(
    ("setup", "op", "steps"),
    [
        # canary v2 -> active, active v1 -> retired, rollout state (history, canary clock)
        ("canary", ("promote", "v2", "active"), 2),
        # new canary v3, old canary v2 -> retired, canary clock
        ("canary+approved", ("promote", "v3", "canary"), 2),
        # active v2 -> retired, retired v1 -> active again, history popped
        ("promoted", ("rollback", "-", "-"), 2),
    ],
)
def test_a_move_killed_between_its_steps_leaves_the_registry_as_it_was(
    session_factory: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    setup: str,
    op: tuple[str, str, str],
    steps: int,
) -> None:
    import signal

    from server.store.rollout import promote

    for name in ("v1", "v2", "v3"):
        approved_adapter(session_factory, tmp_path, name)
    with session_factory() as session:
        promote(session=session, name="v1", to="active", actor="t")
        promote(session=session, name="v2", to="canary", actor="t")
        if setup == "promoted":
            promote(session=session, name="v2", to="active", actor="t")
    before = _snapshot(session_factory)

    for kill_after in range(1, steps + 1):
        assert _run_child(db_url, kill_after, *op) == -signal.SIGKILL
        assert _snapshot(session_factory) == before, f"half-moved after step {kill_after}"

    # Not killed, the same move completes.
    assert _run_child(db_url, 0, *op) == 0
    after = _snapshot(session_factory)
    assert after[0] != before[0] and after[1] > before[1]
    expected = {
        "canary": {"v1": "retired", "v2": "active", "v3": "approved"},
        "canary+approved": {"v1": "active", "v2": "retired", "v3": "canary"},
        "promoted": {"v1": "active", "v2": "retired", "v3": "approved"},
    }[setup]
    assert after[0] == expected


def test_an_error_inside_atomic_undoes_every_move_of_the_block(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    approved_adapter(session_factory, tmp_path, "v1")
    approved_adapter(session_factory, tmp_path, "v2")
    with session_factory() as session:
        v1 = registry.get_adapter(session=session, name="v1")
        v2 = registry.get_adapter(session=session, name="v2")
        assert v1 is not None and v2 is not None
        with pytest.raises(registry.TransitionError), registry.atomic(session):
            registry.transition(session=session, adapter=v1, to_state="active", actor="t")
            registry.transition(session=session, adapter=v2, to_state="rejected", actor="t")
    with session_factory() as session:
        states = {a.name: a.state for a in registry.list_adapters(session=session)}
    assert states == {"v1": "approved", "v2": "approved"}
