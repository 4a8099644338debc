"""The gate's statistics: Student-t quantiles without scipy, per-problem means, lower bounds
(batched like a single one) and the per-round level."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.stats import cluster_index, cluster_means, lower_bound, per_round_alpha, t_quantile


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    # From tables of Student's t.
    [
        (0.95, 1, 6.3138),
        (0.975, 2, 4.3027),
        (0.95, 9, 1.8331),
        (0.995, 11, 3.1058),
        (0.995, 59, 2.6618),
        (0.995, 223, 2.5976),
        (0.95, 1000, 1.6464),
    ],
)
def test_t_quantiles_match_the_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-3)


def test_cluster_means_average_the_variants_of_a_problem() -> None:
    index, count = cluster_index(["a", "b", "a", "c"])
    assert index.tolist() == [0, 1, 0, 2] and count == 3
    assert cluster_means([1.0, 0.0, 0.0, 1.0], index, count).tolist() == [0.5, 0.0, 1.0]
    batch = cluster_means(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]), index, count)
    assert batch.tolist() == [[0.5, 0.0, 1.0], [1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="3 values for 4 rows"):
        cluster_means([1.0, 0.0, 0.0], index, count)


def test_lower_bound_is_the_t_bound_and_batches_like_one() -> None:
    d = np.array([0.0, 1.0, 0.5, -0.25, 0.75])
    bound = lower_bound(d, 0.05)
    expected = d.mean() - t_quantile(0.95, 4) * d.std(ddof=1) / np.sqrt(5)
    assert bound.n == 5 and bound.lower == pytest.approx(expected)
    batch = lower_bound(np.stack([d, -d]), 0.05)
    assert np.allclose(batch.lower, [expected, -d.mean() - (d.mean() - expected)])
    # Nothing to bound a single problem with.
    assert lower_bound([1.0], 0.05).lower == -np.inf
    with pytest.raises(ValueError, match="level"):
        lower_bound(d, 0.0)


def test_the_bound_holds_at_its_level() -> None:
    rng = np.random.default_rng(3)
    d = rng.choice([-1.0, 0.0, 0.0, 0.0, 1.0], size=(20000, 200))  # mean 0, discrete
    misses = np.asarray(lower_bound(d, 0.05).lower) > 0
    assert misses.mean() == pytest.approx(0.05, abs=0.006)


def test_per_round_alpha_spends_the_family_over_the_rounds() -> None:
    assert per_round_alpha(0.05, 10) == pytest.approx(0.005)
    assert per_round_alpha(0.05, 1) == 0.05
    with pytest.raises(ValueError, match="rounds"):
        per_round_alpha(0.05, 0)
    with pytest.raises(ValueError, match="family_alpha"):
        per_round_alpha(1.5, 10)
