"""The canary's rule: a sequential test, per metric, of "the canary is no worse than the active
version" against "it is ``regression_points`` worse", on the acceptance rate and the CI pass
rate of completions served since the canary started.

Per metric, with the canary's and the active version's observed rates, ``D`` their difference
and ``V`` its variance (plug-in, binomial), the log-likelihood ratio of a difference of 0
against one of ``-d`` (``d = regression_points / 100``) is ``d * (D + d / 2) / V``; Wald's
bounds ``log((1 - beta) / alpha)`` and ``log(beta / (1 - alpha))`` make it say "no worse" or
"worse". The canary is

* rolled back as soon as one metric says "worse";
* promoted once every metric says "no worse";
* left alone before ``min_samples`` per side of a metric and before ``min_hours``;
* decided at ``max_hours`` or ``max_samples`` shown on the canary: promoted only if every
  metric with ``min_samples`` per side has a one-sided lower bound (level ``alpha``) of its
  difference above ``-d``; rolled back otherwise (also when no metric has enough data).

``alpha`` bounds the chance of promoting a canary that is ``regression_points`` worse; ``beta``
the chance of rolling back an equal one on one metric. ``benchmarks/gate_power.py`` simulates
:func:`decide` and prints the rates it reaches. Every function works on numbers or numpy arrays
(one simulated canary per element).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["CanaryConfig", "CanaryDecision", "MetricCounts", "decide"]

WAIT, PROMOTE, ROLLBACK = "wait", "promote", "rollback"


@dataclass(frozen=True)
class CanaryConfig:
    """The canary's sequential test (server settings ``KAIZEN_CANARY_*``)."""

    regression_points: float = field(
        default=5.0, metadata={"help": "The loss in points the test must catch."}
    )
    alpha: float = field(
        default=0.05, metadata={"help": "Chance of promoting a canary that much worse."}
    )
    beta: float = field(
        default=0.2, metadata={"help": "Chance, per metric, of rolling back an equal canary."}
    )
    min_samples: int = field(
        default=50, metadata={"help": "Per side and metric, before that metric can decide."}
    )
    min_hours: float = field(default=1.0, metadata={"help": "No decision before this."})
    max_hours: float = field(default=72.0, metadata={"help": "Decide by this, whatever."})
    max_samples: int = field(
        default=5000, metadata={"help": "Or once the canary has shown this many completions."}
    )

    def __post_init__(self) -> None:
        if not 0 < self.regression_points < 100:
            raise ValueError(f"regression_points must be in (0, 100): {self.regression_points}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not 0 < value < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {value}; 0.05 / 0.2 are usual")
        if self.min_samples < 1 or self.max_samples < self.min_samples:
            raise ValueError(
                f"need 1 <= min_samples <= max_samples, got {self.min_samples}, {self.max_samples}"
            )
        if not 0 <= self.min_hours < self.max_hours:
            raise ValueError(
                f"need 0 <= min_hours < max_hours, got {self.min_hours}, {self.max_hours}"
            )

    @classmethod
    def from_settings(cls, settings: Any) -> CanaryConfig:
        return cls(
            regression_points=settings.canary_regression_points,
            alpha=settings.canary_alpha,
            beta=settings.canary_beta,
            min_samples=settings.rollout_min_samples,
            min_hours=settings.canary_min_hours,
            max_hours=settings.canary_max_hours,
            max_samples=settings.canary_max_samples,
        )


@dataclass(frozen=True)
class MetricCounts:
    """Successes and trials of one metric on each side (numbers or arrays)."""

    canary_successes: Any
    canary_trials: Any
    active_successes: Any
    active_trials: Any


@dataclass
class CanaryDecision:
    action: Any  # "wait" | "promote" | "rollback" (an array of them for array input)
    reason: str  # for a single canary: what decided, with the numbers
    evidence: dict[str, dict[str, Any]]  # per metric: rates, difference, llr, verdict


def _metric(counts: MetricCounts, config: CanaryConfig) -> dict[str, Any]:
    xc, nc = np.asarray(counts.canary_successes, float), np.asarray(counts.canary_trials, float)
    xa, na = np.asarray(counts.active_successes, float), np.asarray(counts.active_trials, float)
    d = config.regression_points / 100
    # Rates shrunk by half a success, so an all-pass start does not give a zero variance.
    pc, pa = (xc + 0.5) / (nc + 1), (xa + 0.5) / (na + 1)
    diff = pc - pa
    var = pc * (1 - pc) / np.maximum(nc, 1) + pa * (1 - pa) / np.maximum(na, 1)
    llr = d * (diff + d / 2) / var
    upper = math.log((1 - config.beta) / config.alpha)
    lower = math.log(config.beta / (1 - config.alpha))
    enough = (nc >= config.min_samples) & (na >= config.min_samples)
    verdict = np.where(
        ~enough, "waiting", np.where(llr >= upper, "no worse", np.where(llr <= lower, "worse", "?"))
    )
    z = NormalDist().inv_cdf(1 - config.alpha)
    bound_ok = diff - z * np.sqrt(var) > -d  # the fixed-sample test used at the deadline
    return {
        "canary_rate": pc,
        "active_rate": pa,
        "canary_n": nc,
        "active_n": na,
        "difference_points": diff * 100,
        "llr": llr,
        "verdict": verdict,
        "enough": enough,
        "bound_ok": bound_ok,
    }


def decide(metrics: dict[str, MetricCounts], config: CanaryConfig, *, hours: Any) -> CanaryDecision:
    """What to do with the canary now (module docstring); ``hours`` since it started."""
    if not metrics:
        raise ValueError("no metrics to judge the canary on")
    found = {name: _metric(counts, config) for name, counts in metrics.items()}
    verdicts = [m["verdict"] for m in found.values()]
    worse = np.any([v == "worse" for v in verdicts], axis=0)
    no_worse = np.all([v == "no worse" for v in verdicts], axis=0)
    shown = np.max([m["canary_n"] for m in found.values()], axis=0)
    hours = np.asarray(hours, float)
    early = hours < config.min_hours
    deadline = (hours >= config.max_hours) | (shown >= config.max_samples)
    enough = np.asarray([m["enough"] for m in found.values()])
    bound_ok = np.asarray([m["bound_ok"] for m in found.values()])
    # At the deadline: every metric with enough data clears the bound, and at least one has.
    late_ok = np.all(bound_ok | ~enough, axis=0) & np.any(enough, axis=0)
    action = np.where(
        early,
        WAIT,
        np.where(
            worse,
            ROLLBACK,
            np.where(
                no_worse, PROMOTE, np.where(deadline, np.where(late_ok, PROMOTE, ROLLBACK), WAIT)
            ),
        ),
    )
    evidence = {
        name: {k: (v.item() if np.ndim(v) == 0 and hasattr(v, "item") else v) for k, v in m.items()}
        for name, m in found.items()
    }
    reason = ""
    if np.ndim(action) == 0:
        action = str(action)
        parts = [
            f"{name} {e['canary_rate']:.3f} vs {e['active_rate']:.3f} "
            f"(n {int(e['canary_n'])}/{int(e['active_n'])}, llr {e['llr']:+.2f}: {e['verdict']})"
            for name, e in evidence.items()
        ]
        why = {
            WAIT: "waiting",
            ROLLBACK: "worse" if bool(worse) else "no evidence it is no worse by the deadline",
            PROMOTE: "no worse" if bool(no_worse) else "no worse at the deadline (fixed bound)",
        }[action]
        reason = (
            f"{why}: "
            + "; ".join(parts)
            + f"; regression {config.regression_points:g} points, alpha {config.alpha:g}, "
            f"beta {config.beta:g}, after {float(hours):.1f} h"
        )
    return CanaryDecision(action=action, reason=reason, evidence=evidence)
