"""Bootstrap intervals, exact McNemar and the paired bootstrap against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from hnclip.evaluate.stats import (
    bootstrap_ci,
    bootstrap_replicates,
    exact_binomial_two_sided,
    mcnemar_exact,
    paired_bootstrap,
    resampled_cluster_counts,
)


# --- McNemar -------------------------------------------------------------------------------------

def _paired_outcomes(b01: int, b10: int, both_right: int = 3, both_wrong: int = 2):
    """Correctness vectors whose 2×2 table has the given discordant counts."""
    a = [False] * b01 + [True] * b10 + [True] * both_right + [False] * both_wrong
    b = [True] * b01 + [False] * b10 + [True] * both_right + [False] * both_wrong
    return np.array(a), np.array(b)


def test_mcnemar_all_discordant_one_way():
    a, b = _paired_outcomes(b01=0, b10=5)
    result = mcnemar_exact(a, b)
    assert result == {"b01": 0, "b10": 5, "p_value": 2 * 0.5**5}
    assert result["p_value"] == 0.0625


def test_mcnemar_one_against_nine():
    a, b = _paired_outcomes(b01=1, b10=9)
    # 2 × (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert mcnemar_exact(a, b)["p_value"] == 0.021484375


def test_mcnemar_is_symmetric_and_counts_the_right_cells():
    a, b = _paired_outcomes(b01=2, b10=7)
    forward, backward = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (forward["b01"], forward["b10"]) == (2, 7)
    assert (backward["b01"], backward["b10"]) == (7, 2)
    assert forward["p_value"] == backward["p_value"] == 2 * (1 + 9 + 36) / 2**9


def test_mcnemar_without_discordant_items_is_one():
    a, b = _paired_outcomes(b01=0, b10=0)
    assert mcnemar_exact(a, b)["p_value"] == 1.0


def test_mcnemar_balanced_discordance_caps_at_one():
    a, b = _paired_outcomes(b01=4, b10=4)
    assert mcnemar_exact(a, b)["p_value"] == 1.0


def test_mcnemar_accepts_zero_one_integers():
    assert mcnemar_exact([0, 0, 1], [1, 1, 1]) == {"b01": 2, "b10": 0, "p_value": 0.5}


def test_mcnemar_rejects_unpaired_and_non_binary_input():
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0, 2], [1, 1])


def test_exact_binomial_large_n_matches_symmetric_reference():
    # n = 2000 discordant items split evenly: p = 1; 900 vs 1100 is significant.
    assert exact_binomial_two_sided(1000, 2000) == 1.0
    assert exact_binomial_two_sided(900, 2000) < 1e-5


# --- bootstrap CIs --------------------------------------------------------------------------------

def test_ci_of_a_constant_is_a_point():
    ci = bootstrap_ci(np.full(37, 0.25), clusters=np.arange(37) % 5, n_boot=300)
    assert ci.value == 0.25
    assert ci.ci_low == pytest.approx(0.25, abs=1e-15)
    assert ci.ci_high == pytest.approx(0.25, abs=1e-15)


def test_bootstrap_is_deterministic_by_seed():
    values = np.random.default_rng(1).random(50)
    first = bootstrap_ci(values, n_boot=500, seed=7)
    assert bootstrap_ci(values, n_boot=500, seed=7) == first
    assert bootstrap_ci(values, n_boot=500, seed=8) != first


def test_multiplicity_blocks_draw_each_cluster_count_times():
    blocks = list(resampled_cluster_counts(6, n_boot=10, seed=0))
    counts = np.concatenate(blocks)
    assert counts.shape == (10, 6)
    assert (counts.sum(axis=1) == 6).all()


def test_clusters_are_resampled_whole():
    # Every image's two pairs sum to zero, so any resample of whole images has mean exactly 0;
    # resampling items breaks the pairs apart and gives a wide interval.
    per_image = np.random.default_rng(2).random(30)
    values = np.repeat(per_image, 2) * np.tile([1.0, -1.0], 30)
    images = np.repeat(np.arange(30), 2)
    clustered = bootstrap_ci(values, images, n_boot=400)
    assert (clustered.ci_low, clustered.ci_high) == pytest.approx((0.0, 0.0), abs=1e-12)
    independent = bootstrap_ci(values, None, n_boot=400)
    assert independent.ci_high - independent.ci_low > 0.1


def test_duplicated_clusters_equal_the_bootstrap_of_cluster_values():
    # Clusters of 4 identical items: the cluster bootstrap is the item bootstrap of one value per
    # cluster (same number of clusters, same seed, so the same draws).
    per_cluster = np.random.default_rng(3).integers(0, 2, size=25).astype(float)
    values = np.repeat(per_cluster, 4)
    clusters = np.repeat([f"img{i:02d}" for i in range(25)], 4)
    assert bootstrap_ci(values, clusters, n_boot=500, seed=4) == pytest.approx(
        bootstrap_ci(per_cluster, None, n_boot=500, seed=4)
    )


def test_generic_statistic_path_matches_vectorised_mean():
    values = np.random.default_rng(5).random(40)
    clusters = np.arange(40) // 3  # uneven last cluster on purpose
    fast = bootstrap_replicates(values, clusters, n_boot=200, seed=1)
    slow = bootstrap_replicates(values, clusters, n_boot=200, seed=1, statistic=lambda v: float(np.mean(v)))
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_median_statistic_is_supported():
    ci = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 100.0], n_boot=300, statistic=np.median)
    assert ci.value == 3.0
    assert 1.0 <= ci.ci_low <= 3.0 <= ci.ci_high <= 100.0


def test_binomial_coverage_is_close_to_nominal():
    rng = np.random.default_rng(11)
    true_p, n, trials = 0.3, 200, 200
    covered = 0
    for trial in range(trials):
        sample = (rng.random(n) < true_p).astype(float)
        ci = bootstrap_ci(sample, n_boot=400, seed=trial)
        covered += ci.ci_low <= true_p <= ci.ci_high
    assert 0.89 <= covered / trials <= 0.99


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="clusters has shape"):
        bootstrap_ci([1.0, 2.0], clusters=[1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)


# --- paired bootstrap ----------------------------------------------------------------------------

def test_paired_bootstrap_identical_models():
    a = np.random.default_rng(6).integers(0, 2, size=40)
    result = paired_bootstrap(a, a, n_boot=300)
    assert result == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_bootstrap_one_model_always_right():
    result = paired_bootstrap(np.ones(20), np.zeros(20), n_boot=999)
    # Every replicate is +1: one tail is empty, so p = 2 · (0 + 1) / (999 + 1).
    assert result == {"delta": 1.0, "ci_low": 1.0, "ci_high": 1.0, "p_value": 0.002}


def test_paired_bootstrap_equals_bootstrap_of_differences():
    rng = np.random.default_rng(9)
    a, b = rng.random(60), rng.random(60)
    clusters = np.arange(60) // 4
    result = paired_bootstrap(a, b, clusters, n_boot=500, seed=2)
    ci = bootstrap_ci(a - b, clusters, n_boot=500, seed=2)
    assert result["delta"] == pytest.approx(a.mean() - b.mean())
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((ci.ci_low, ci.ci_high))
    replicates = bootstrap_replicates(a - b, clusters, n_boot=500, seed=2)
    smaller_tail = min((replicates <= 0).sum(), (replicates >= 0).sum()) + 1
    assert result["p_value"] == pytest.approx(min(1.0, 2 * smaller_tail / 501))


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([1.0, 0.0], [1.0], n_boot=10)
