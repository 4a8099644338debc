"""The canary's judgement in a replica: read what users and CI said about the canary and the
active version since the canary started, apply the sequential rule of
:mod:`server.services.canary`, and promote or roll back through the registry's moves.

Several replicas may judge at once; the moves are compare-and-set, so only one of them moves
the registry and the others find the canary gone (``canary_decided_elsewhere``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from server.config import Settings
from server.services.canary import CanaryConfig, MetricCounts, decide
from server.store import registry
from server.store.canary import canary_counts
from server.store.rollout import RolloutError, get_rollout_state, promote, rollback

log = logging.getLogger(__name__)


def judge_canary(*, session: Session, settings: Settings) -> list[str]:
    """Promote or roll back the canary; returns what changed (nothing while paused, pinned or
    undecided). The decision and its evidence go to the audit trail (the transition's reason)
    and onto the canary (``evaluation["canary"]``), in the same transaction as the move."""
    config = CanaryConfig.from_settings(settings)
    state = get_rollout_state(session=session)
    canary = registry.canary_adapter(session=session)
    active = registry.active_adapter(session=session)
    if (
        not state.auto_rollout
        or state.pinned_adapter_id is not None
        or canary is None
        or state.canary_started_at is None
    ):
        return []
    now = datetime.now(UTC)
    active_name = active.name if active else None
    # Only completions served while the canary ran, on both sides.
    counts = canary_counts(
        session=session,
        adapters=[canary.name, active_name],
        since=state.canary_started_at,
        until=now,
    )
    new, old = counts[canary.name], counts[active_name]
    result = decide(
        {
            "acceptance": MetricCounts(new.accepted, new.shown, old.accepted, old.shown),
            "ci_pass": MetricCounts(new.passed, new.judged, old.passed, old.judged),
        },
        config,
        hours=(now - state.canary_started_at).total_seconds() / 3600,
    )
    if result.action == "wait":
        return []
    canary.evaluation = {
        **(canary.evaluation or {}),
        "canary": {
            "decision": result.action,
            "reason": result.reason,
            "against": active_name,
            "since": state.canary_started_at.isoformat(),
            "until": now.isoformat(),
            "counts": {"canary": asdict(new), "active": asdict(old)},
            "evidence": result.evidence,
            "config": asdict(config),
        },
    }
    try:
        if result.action == "rollback":
            log.warning("event=canary_rollback name=%s %s", canary.name, result.reason)
            return rollback(session=session, actor="canary", reason=f"canary {result.reason}")
        log.info("event=canary_promote name=%s %s", canary.name, result.reason)
        return promote(
            session=session,
            name=canary.name,
            to="active",
            actor="canary",
            reason=f"canary {result.reason}",
        )
    except (RolloutError, registry.TransitionError) as exc:
        log.info("event=canary_decided_elsewhere reason=%r", str(exc))
        return []
