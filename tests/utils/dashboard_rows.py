"""Hand-made rows for the dashboard's tests: completions with their choice, IDE events, CI runs
with outcomes, registry moves and a training round, at chosen times, in the real tables."""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store.models import (
    CiRun,
    Completion,
    CompletionEvent,
    CompletionOutcome,
    RecordedChoice,
)
from server.store.rollout import promote, rollback
from server.store.rounds import start_round, update_round
from tests.utils.adapters import approved_adapter

_ids = itertools.count(1)


def completion(
    session: Session,
    cid: str,
    *,
    adapter: str | None,
    at: datetime,
    text: str = "return a + b",
    source: str = "serve",
) -> None:
    session.add(
        Completion(
            id=cid,
            created_at=at,
            endpoint="completions",
            model="fake-model",
            adapter=adapter,
            prompt="def add(a, b):\n    ",
            suffix="\n",
            params={},
            stream=False,
            status="completed",
            latency_ms=5.0,
            source=source,
        )
    )
    session.add(RecordedChoice(completion_id=cid, index=0, text=text, finish_reason="stop"))
    session.commit()


def event(session: Session, cid: str, kind: str, at: datetime) -> None:
    session.add(CompletionEvent(id=f"ev-{next(_ids)}", completion_id=cid, type=kind, timestamp=at))
    session.commit()


def outcome(
    session: Session, cid: str, status: str, *, at: datetime, final_text: str = "return a + b"
) -> None:
    """One CI run (arriving at ``at``) with a verdict on ``cid``."""
    run_id = f"run-{next(_ids)}"
    run = CiRun(
        run_id=run_id,
        repository="github.com/acme/app",
        repository_key="github.com/acme/app",
        commit="c0ffee",
        status=status,
        tests=[],
        raw={},
        received_at=at,
    )
    session.add(run)
    session.flush()
    session.add(
        CompletionOutcome(
            ci_run_id=run.id,
            run_id=run_id,
            completion_id=cid,
            file_path="app.py",
            final_text=final_text,
            status=status,
            tests=[],
            received_at=at,
        )
    )
    session.commit()


GATE_EVALUATION: dict[str, Any] = {
    "decision": "approved",
    "reasons": ["pooled gain +6.0 points, lower bound +1.2 at 99.6%"],
    "baseline": None,
    "pooled": {"problems": 60, "gain_points": 6.0, "lower_points": 1.2, "level": 0.004},
    "bounds": {
        "mbpp_dev": {
            "problems": 40,
            "gain_points": 7.5,
            "lower_points": -0.5,
            "level": 0.05,
            "judged": True,
        },
        "recorded": {
            "problems": 20,
            "gain_points": 3.0,
            "lower_points": -4.0,
            "level": 0.05,
            "judged": True,
        },
    },
    "pass_rates": {
        "mbpp_dev": {"baseline": 0.5, "candidate": 0.575},
        "recorded": {"baseline": 0.4, "candidate": 0.43},
    },
}

FUNNEL: dict[str, Any] = {
    "completions": 120,
    "outcome_records": 80,
    "records_with_verdict": 64,
    "pairs": {"pairs": 30, "pairs_by_source": {"fix": 6, "resample": 20, "ci_resample": 4}},
    "selection": {"selected": 18},
    "selected_by_source": {"fix": 4, "resample": 12, "ci_resample": 2},
    "trained_pairs": 18,
    "gate": {"decision": "approved", "reasons": [], "changes": ["kaizen-r1 is the canary"]},
}


def registry_history(factory: sessionmaker[Session], root: Path) -> dict[str, int]:
    """Two versions through the registry's own moves: v1 canary -> active; a round trains v2
    from v1, v2 canary -> rolled back; v3 canary (running). Returns the adapters' ids."""
    v1 = approved_adapter(factory, root, "kaizen-r0")
    with factory() as session:
        promote(session=session, name="kaizen-r0", to="canary", actor="trainer")
        promote(session=session, name="kaizen-r0", to="active", actor="canary")
        row = start_round(
            session=session,
            trigger="records",
            records_until=datetime.now().astimezone(),
            parent_adapter_id=v1.id,
            work_dir=str(root / "round-1"),
            config={},
        )
    v2 = approved_adapter(factory, root, "kaizen-r1")
    v3 = approved_adapter(factory, root, "kaizen-r2")
    with factory() as session:
        for adapter, parent in ((v2, v1), (v3, v1)):
            a = session.get(type(adapter), adapter.id)
            a.parent_id, a.round_id = parent.id, row.id
        session.get(type(v2), v2.id).evaluation = GATE_EVALUATION
        session.commit()
        update_round(
            session=session, round_id=row.id, status="succeeded", adapter_id=v2.id, funnel=FUNNEL
        )
        promote(session=session, name="kaizen-r1", to="canary", actor="trainer")
        rollback(session=session, actor="canary", reason="canary worse")
        promote(session=session, name="kaizen-r2", to="canary", actor="ops:alice")
        assert registry.canary_adapter(session=session).name == "kaizen-r2"
    return {"kaizen-r0": v1.id, "kaizen-r1": v2.id, "kaizen-r2": v3.id}
