"""The canary's judgement in a replica: read what users and CI said about the canary and the
active version since the canary started, apply the sequential rule of
:mod:`server.services.canary`, and promote or roll back through the registry's moves.

Several replicas may judge at once; the moves are compare-and-set, so only one of them moves
the registry and the others find the canary gone (``canary_decided_elsewhere``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from server.config import Settings
from server.services.canary import CanaryConfig, CanaryDecision, MetricCounts, decide
from server.store import registry
from server.store.canary import CanaryCounts, canary_counts
from server.store.models import Adapter
from server.store.rollout import RolloutError, get_rollout_state, promote, rollback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryComparison:
    """The canary against the active version since the canary started, and what the rule says
    of it now."""

    canary: Adapter
    active_name: str | None  # None: the base model
    since: datetime
    until: datetime
    new: CanaryCounts  # the canary's side
    old: CanaryCounts  # the active side
    result: CanaryDecision
    config: CanaryConfig

    @property
    def hours(self) -> float:
        return (self.until - self.since).total_seconds() / 3600


def compare_canary(
    *, session: Session, settings: Settings, now: datetime | None = None
) -> CanaryComparison | None:
    """The live comparison (None without a canary): counts on both sides over completions
    served while the canary ran, and the sequential rule's decision on them. What the judge
    acts on and what the ops dashboard shows."""
    state = get_rollout_state(session=session)
    canary = registry.canary_adapter(session=session)
    if canary is None or state.canary_started_at is None:
        return None
    active = registry.active_adapter(session=session)
    active_name = active.name if active else None
    now = now or datetime.now(UTC)
    config = CanaryConfig.from_settings(settings)
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
    return CanaryComparison(
        canary, active_name, state.canary_started_at, now, new, old, result, config
    )


def judge_canary(*, session: Session, settings: Settings) -> list[str]:
    """Promote or roll back the canary; returns what changed (nothing while paused, pinned or
    undecided). The decision and its evidence go to the audit trail (the transition's reason)
    and onto the canary (``evaluation["canary"]``), in the same transaction as the move."""
    state = get_rollout_state(session=session)
    if not state.auto_rollout or state.pinned_adapter_id is not None:
        return []
    comparison = compare_canary(session=session, settings=settings)
    if comparison is None:
        return []
    canary, active_name, result = comparison.canary, comparison.active_name, comparison.result
    new, old, config, now = comparison.new, comparison.old, comparison.config, comparison.until
    if result.action == "wait":
        return []
    canary.evaluation = {
        **(canary.evaluation or {}),
        "canary": {
            "decision": result.action,
            "reason": result.reason,
            "against": active_name,
            "since": comparison.since.isoformat(),
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
