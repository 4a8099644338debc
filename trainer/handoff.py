"""The round's last stage: gate a candidate and hand an approved one to the canary.

:func:`gate_and_canary` runs :func:`trainer.gate.run_gate` against the active adapter; an
approved candidate becomes the canary through the registry's own move
(:func:`server.store.rollout.promote`, audited as the ``trainer``) unless ops paused automatic
rollout or pinned a version. From there the serving replicas' canary judge takes over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.store.rollout import RolloutError, get_rollout_state, promote
from trainer.gate import GateConfig, run_gate
from trainer.generate import GeneratorFactory
from trainer.sandbox import Sandbox
from trainer.tasks import Task

__all__ = ["gate_and_canary"]

log = logging.getLogger(__name__)


def gate_and_canary(
    settings: Settings,
    session_factory: sessionmaker[Session],
    adapter_name: str,
    generator: GeneratorFactory,
    *,
    canary: bool = True,
    progress: bool = True,
    suites: Mapping[str, Sequence[Task]] | None = None,
) -> dict[str, Any]:
    """Gate a candidate; an approved one becomes the canary when ``canary`` and automatic
    rollout is on (not paused, nothing pinned). Returns the decision, reasons and changes.
    ``suites`` (name -> tasks) replaces the configured suites (tests use toy ones)."""
    engine = generator()
    try:
        result = run_gate(
            session_factory=session_factory,
            adapter_name=adapter_name,
            generator=engine,
            sandbox=Sandbox(workers=2),
            mbpp_path=settings.mbpp_path,
            config=GateConfig.from_settings(settings),
            progress=progress,
            suites=suites,
        )
    finally:
        engine.close()
    out: dict[str, Any] = {"decision": result.decision, "reasons": result.reasons, "changes": []}
    if result.approved and canary:
        with session_factory() as session:
            state = get_rollout_state(session=session)
            if state.auto_rollout and state.pinned_adapter_id is None:
                try:
                    out["changes"] = promote(
                        session=session,
                        name=adapter_name,
                        to="canary",
                        actor="trainer",
                        reason="approved by the gate",
                    )
                except RolloutError as exc:
                    out["changes"] = [f"not made the canary: {exc}"]
            else:
                out["changes"] = [
                    "automatic rollout is paused or a version is pinned: promote it by hand"
                ]
    log.info(
        "event=gate_done adapter=%s decision=%s changes=%r",
        adapter_name,
        result.decision,
        out["changes"],
    )
    return out
