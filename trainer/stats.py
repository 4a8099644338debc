"""The statistics the gate decides with: paired gains over problems (clusters), their one-sided
lower confidence bounds, and the per-round level that keeps false approvals in check over
repeated gating.

Every function takes numpy arrays with any leading batch axes, so ``benchmarks/gate_power.py``
runs thousands of simulated gates through exactly the code a real gate runs once.

Why clusters: HumanEval and its single-line infill are one problem asked twice; their results
move together, so counting them as two independent tasks understates the variance (the old
pooled McNemar test approved 1.7-4.8% of no-gain candidates per round). Here each problem is one
observation, its variants averaged first, and the bound is a cluster-robust (Student-t) bound
on the mean paired gain per problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Bound",
    "cluster_index",
    "cluster_means",
    "lower_bound",
    "per_round_alpha",
    "t_quantile",
]


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher
    expansion of the normal quantile, error below 1e-3 for df >= 5; no scipy needed)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    z = NormalDist().inv_cdf(p)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def cluster_index(problem_ids: Sequence[str]) -> tuple[NDArray[np.int64], int]:
    """``(index, count)``: for each row, the number of its problem (first-seen order)."""
    numbers: dict[str, int] = {}
    index = np.array([numbers.setdefault(p, len(numbers)) for p in problem_ids], dtype=np.int64)
    return index, len(numbers)


def cluster_means(values: ArrayLike, index: NDArray[np.int64], count: int) -> NDArray[np.float64]:
    """Per problem, the mean of its rows' ``values`` (last axis: rows; result's: problems)."""
    x = np.asarray(values, dtype=np.float64)
    if x.shape[-1] != len(index):
        raise ValueError(f"{x.shape[-1]} values for {len(index)} rows")
    # A row-to-problem matrix: one product sums every batch at once.
    onehot = np.zeros((len(index), count))
    onehot[np.arange(len(index)), index] = 1.0
    sums = x @ onehot
    sizes = np.bincount(index, minlength=count).astype(np.float64)
    return sums / sizes


@dataclass(frozen=True)
class Bound:
    """A mean paired gain (fraction, not points) with its one-sided lower confidence bound."""

    n: NDArray[np.int64] | int  # problems
    mean: NDArray[np.float64] | float
    lower: NDArray[np.float64] | float  # -inf where n < 2: nothing to bound with
    level: float  # the bound holds with probability 1 - level


def lower_bound(diffs: ArrayLike, level: float) -> Bound:
    """Student-t lower bound of the mean of ``diffs`` (last axis: one paired gain per problem),
    holding with probability ``1 - level``. With fewer than two problems the bound is -inf."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = np.asarray(diffs, dtype=np.float64)
    n = d.shape[-1]
    mean = d.mean(axis=-1) if n else np.zeros(d.shape[:-1])
    if n < 2:
        return Bound(n=n, mean=mean, lower=np.full(np.shape(mean), -np.inf), level=level)
    se = d.std(axis=-1, ddof=1) / math.sqrt(n)
    return Bound(n=n, mean=mean, lower=mean - t_quantile(1 - level, n - 1) * se, level=level)


def per_round_alpha(family_alpha: float, rounds: int) -> float:
    """The one-sided level of one gating round such that, over any ``rounds`` consecutive
    rounds, the chance of approving at least one candidate with no true gain is at most
    ``family_alpha`` (Bonferroni: valid however the rounds depend on each other, e.g. through
    the same fixed suites)."""
    if not 0 < family_alpha < 1:
        raise ValueError(f"family_alpha must be in (0, 1), got {family_alpha}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    return family_alpha / rounds
