"""The canary's sequential rule on synthetic streams: error rates at -5/0/+5 points, waiting
before the minimum duration and sample count, the deadline's fixed bound, and the evidence it
reports."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.gate_power import Traffic, simulate_canary
from server.services.canary import CanaryConfig, MetricCounts, decide


def _metrics(canary: tuple[int, int], active: tuple[int, int]) -> dict[str, MetricCounts]:
    return {"acceptance": MetricCounts(*canary, *active)}


def test_worse_canaries_are_rolled_back_and_better_ones_promoted_at_the_stated_rates() -> None:
    config = CanaryConfig()
    worse = simulate_canary(config, Traffic(), delta_points=-5.0, sims=300, seed=1)
    better = simulate_canary(config, Traffic(), delta_points=5.0, sims=300, seed=2)
    assert worse["promoted"] <= 0.05
    assert better["promoted"] >= 0.80
    assert worse["promoted"] + worse["rolled_back"] == 1.0  # every canary was decided
    # The old rule (50 samples, 2-point tolerance) promoted 26% of 5-point-worse canaries.


def test_a_stream_decides_once_its_evidence_is_strong_enough() -> None:
    config = CanaryConfig(min_hours=0.0)
    rng = np.random.default_rng(0)
    canary = rng.random(4000) < 0.24  # 6 points worse than the active version's 0.30
    active = rng.random(36000) < 0.30
    actions = []
    for n in range(50, 4001, 10):
        c, a = canary[:n], active[: 9 * n]
        result = decide(_metrics((c.sum(), n), (a.sum(), 9 * n)), config, hours=2.0)
        actions.append(result.action)
    first = next(i for i, a in enumerate(actions) if a != "wait")
    assert actions[first] == "rollback" and set(actions[:first]) == {"wait"}
    assert first < len(actions) - 1  # well before the sample limit


@pytest.mark.parametrize(
    ("canary", "active", "hours", "expected"),
    [
        ((49, 49), (500, 1000), 5.0, "wait"),  # 49 < min_samples on the canary's side
        ((800, 1000), (800, 1000), 0.5, "wait"),  # before min_hours
        ((900, 1000), (800, 1000), 2.0, "promote"),
        ((600, 1000), (800, 1000), 2.0, "rollback"),
    ],
)
def test_minimum_duration_and_samples(
    canary: tuple[int, int], active: tuple[int, int], hours: float, expected: str
) -> None:
    assert decide(_metrics(canary, active), CanaryConfig(), hours=hours).action == expected


def test_at_the_deadline_the_fixed_bound_decides() -> None:
    config = CanaryConfig()
    # Undecided by the sequential test: 0.295 vs 0.30 on 60 canary samples.
    metrics = _metrics((18, 61), (3000, 10000))
    assert decide(metrics, config, hours=10.0).action == "wait"
    late = decide(metrics, config, hours=config.max_hours)
    # 60 samples cannot rule out a 5-point loss: rolled back, and it says why.
    assert late.action == "rollback"
    assert late.reason.startswith("no evidence it is no worse by the deadline")
    # No metric with enough data by the deadline: rolled back.
    few = decide(_metrics((3, 10), (30, 100)), config, hours=config.max_hours)
    assert few.action == "rollback"
    # A metric without data does not block one that has it.
    both = {
        "acceptance": MetricCounts(2990, 10000, 3000, 10000),
        "ci_pass": MetricCounts(0, 0, 5, 10),
    }
    assert decide(both, config, hours=config.max_hours).action == "promote"


def test_the_decision_carries_its_evidence() -> None:
    metrics = {
        "acceptance": MetricCounts(300, 1000, 2900, 10000),
        "ci_pass": MetricCounts(200, 1000, 1800, 2000),
    }
    result = decide(metrics, CanaryConfig(), hours=3.0)
    assert result.action == "rollback"  # CI: 0.20 against 0.90
    ci: dict[str, Any] = result.evidence["ci_pass"]
    assert ci["verdict"] == "worse" and ci["canary_n"] == 1000 and ci["llr"] < -10
    assert isinstance(ci["llr"], float) and isinstance(ci["verdict"], str)
    assert result.reason.startswith("worse: acceptance 0.300 vs 0.290")
    assert "ci_pass 0.200 vs 0.900 (n 1000/2000" in result.reason
    assert "regression 5 points, alpha 0.05, beta 0.2, after 3.0 h" in result.reason


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"regression_points": 0.0}, "regression_points"),
        ({"alpha": 0.6}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"min_samples": 10, "max_samples": 5}, "min_samples <= max_samples"),
        ({"min_hours": 5.0, "max_hours": 1.0}, "min_hours < max_hours"),
    ],
)
def test_config_refuses_what_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CanaryConfig(**values)
