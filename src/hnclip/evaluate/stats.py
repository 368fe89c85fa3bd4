"""Uncertainty for every reported number: cluster bootstrap CIs, exact McNemar, paired bootstrap.

Items are often not independent: HNC has several caption pairs per image, and a model that misreads an
image tends to fail all of its pairs. Resampling whole clusters (images) keeps that dependence in the
bootstrap; resampling items would make the intervals too narrow.

The resampling is vectorised: a block of bootstrap replicates is one matrix of cluster multiplicities
(replicates × clusters), drawn in chunks so memory stays bounded for large benchmarks.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# Upper bound on the elements of one multiplicity block (int64: 32 MiB).
_BLOCK_ELEMENTS = 1 << 22


class BootstrapCI(NamedTuple):
    """A statistic and its percentile bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float


def _as_values(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: nothing to bootstrap")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return array


def _cluster_codes(n_items: int, clusters: Sequence | np.ndarray | None) -> tuple[np.ndarray, int]:
    """Map cluster labels to 0..C-1; without labels every item is its own cluster."""
    if clusters is None:
        return np.arange(n_items), n_items
    labels = np.asarray(clusters)
    if labels.shape != (n_items,):
        raise ValueError(f"clusters has shape {labels.shape}, expected ({n_items},) to match the values")
    _, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def resampled_cluster_counts(n_clusters: int, *, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield blocks of bootstrap multiplicities: row r, column c = how often replicate r drew cluster c.

    Each replicate draws ``n_clusters`` clusters with replacement. The blocks together hold ``n_boot``
    rows; the stream depends only on (n_clusters, n_boot, seed), so results are reproducible.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK_ELEMENTS // n_clusters)
    done = 0
    while done < n_boot:
        rows = min(rows_per_block, n_boot - done)
        draws = rng.integers(0, n_clusters, size=(rows, n_clusters))
        # One bincount over the whole block: offset each row's draws into its own range of bins.
        offsets = (np.arange(rows) * n_clusters)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=rows * n_clusters)
        yield counts.reshape(rows, n_clusters)
        done += rows


def bootstrap_replicates(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> np.ndarray:
    """The statistic on ``n_boot`` cluster-bootstrap resamples of ``values`` (shape ``(n_boot,)``).

    ``np.mean`` (the default) takes a fully vectorised path: a replicate's mean is the ratio of
    multiplicity-weighted cluster sums to multiplicity-weighted cluster sizes. Any other statistic is
    called once per replicate on the resampled items (clusters repeated as drawn).
    """
    array = _as_values(values)
    codes, n_clusters = _cluster_codes(array.size, clusters)
    blocks = resampled_cluster_counts(n_clusters, n_boot=n_boot, seed=seed)
    if statistic is np.mean:
        cluster_sums = np.bincount(codes, weights=array, minlength=n_clusters)
        cluster_sizes = np.bincount(codes, minlength=n_clusters).astype(np.float64)
        return np.concatenate([(block @ cluster_sums) / (block @ cluster_sizes) for block in blocks])
    replicates = [
        float(statistic(np.repeat(array, counts[codes]))) for block in blocks for counts in block
    ]
    return np.asarray(replicates, dtype=np.float64)


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> BootstrapCI:
    """``statistic(values)`` with a percentile bootstrap interval that resamples whole ``clusters``.

    ``clusters`` holds one label per value (e.g. the image id of each caption pair); ``None`` means
    every value is its own cluster, the ordinary bootstrap.
    """
    _check_level(level)
    array = _as_values(values)
    replicates = bootstrap_replicates(array, clusters, n_boot=n_boot, seed=seed, statistic=statistic)
    low, high = _percentile_interval(replicates, level)
    return BootstrapCI(float(statistic(array)), low, high)


def _as_correctness(values: Sequence | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1 correctness, found other values")
        array = array.astype(bool)
    return array


def exact_binomial_two_sided(successes: int, trials: int) -> float:
    """Two-sided exact binomial test of p = 1/2: min(1, 2 · P[X <= min(k, n - k)]), X ~ Bin(n, 1/2).

    Exact integer arithmetic; the symmetric null makes doubling the smaller tail exact.
    """
    if trials == 0:
        return 1.0
    smaller = min(successes, trials - successes)
    tail = sum(comb(trials, k) for k in range(smaller + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**trials)))


def mcnemar_exact(a_correct: Sequence | np.ndarray, b_correct: Sequence | np.ndarray) -> dict:
    """Exact two-sided McNemar test of paired correctness of two models on the same items.

    ``b01`` counts items that A gets wrong and B right, ``b10`` items A gets right and B wrong. Under
    the null (equal accuracy) each discordant item falls either way with probability 1/2, so the
    p-value is the exact two-sided binomial test on b10 of b01 + b10 trials (1.0 when no item is
    discordant).
    """
    a = _as_correctness(a_correct, "a_correct")
    b = _as_correctness(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"a_correct has {a.size} items but b_correct has {b.size}: they must be paired")
    b01 = int(np.sum(~a & b))
    b10 = int(np.sum(a & ~b))
    return {"b01": b01, "b10": b10, "p_value": exact_binomial_two_sided(b10, b01 + b10)}


def paired_bootstrap(
    a_values: Sequence[float] | np.ndarray,
    b_values: Sequence[float] | np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired difference of means ``delta = mean(a) - mean(b)`` on the same items, with a bootstrap.

    Both models are resampled with the same clusters, i.e. the per-item differences are bootstrapped.
    ``ci_low``/``ci_high`` is the percentile interval of the replicated delta. ``p_value`` inverts that
    interval: it is the smallest 1 - level at which the percentile interval would exclude 0, i.e.
    ``min(1, 2 · min(#{delta* <= 0} + 1, #{delta* >= 0} + 1) / (n_boot + 1))``. The +1 counts the
    observed sample among the replicates, so p is never reported as exactly 0.
    """
    _check_level(level)
    a = _as_values(a_values, "a_values")
    b = _as_values(b_values, "b_values")
    if a.shape != b.shape:
        raise ValueError(f"a_values has {a.size} items but b_values has {b.size}: they must be paired")
    differences = a - b
    replicates = bootstrap_replicates(differences, clusters, n_boot=n_boot, seed=seed)
    low, high = _percentile_interval(replicates, level)
    at_or_below = int(np.sum(replicates <= 0.0)) + 1
    at_or_above = int(np.sum(replicates >= 0.0)) + 1
    p_value = min(1.0, 2.0 * min(at_or_below, at_or_above) / (replicates.size + 1))
    return {"delta": float(differences.mean()), "ci_low": low, "ci_high": high, "p_value": p_value}


# --- Results-table rows for accuracies with paired comparisons ------------------------------------

MCNEMAR_TEST_NAME = "mcnemar_exact"


class ReferenceAlignmentError(KeyError):
    """A reference's per-item results do not cover the items being evaluated."""

    def __str__(self) -> str:  # KeyError would quote the message; show it plainly
        return str(self.args[0])


def align_reference(
    items: pd.DataFrame, reference: pd.DataFrame, key_columns: Sequence[str], name: str,
    value_column: str = "correct",
) -> np.ndarray:
    """The reference's ``value_column`` reordered to match ``items`` row by row, joined on keys.

    A paired test is only valid on the same items, so every item must be found in the reference
    exactly once; extra reference items (a superset) are ignored. ``correct`` is checked to be 0/1;
    another column (a soft VQA accuracy) is returned as floats.
    """
    import pandas as pd  # local: stats stays importable with numpy alone

    keys = list(key_columns)
    missing_columns = [c for c in [*keys, value_column] if c not in reference.columns]
    if missing_columns:
        raise ReferenceAlignmentError(f"reference {name!r} lacks columns {missing_columns}")
    duplicated = reference.duplicated(keys)
    if duplicated.any():
        first = reference.loc[duplicated, keys].iloc[0].to_dict()
        raise ReferenceAlignmentError(f"reference {name!r} holds item {first} more than once")
    merged = pd.merge(
        items[keys], reference[[*keys, value_column]], on=keys, how="left", validate="many_to_one",
        indicator=True,
    )
    absent = merged["_merge"] != "both"
    if absent.any():
        first = merged.loc[absent, keys].iloc[0].to_dict()
        raise ReferenceAlignmentError(
            f"reference {name!r} lacks {int(absent.sum())} of {len(items)} evaluated items, e.g. {first}"
        )
    if value_column != "correct":
        return merged[value_column].to_numpy(dtype=float)
    return _as_correctness(merged["correct"].to_numpy(), f"reference {name!r} correct")


def accuracy_rows(
    correct: np.ndarray,
    clusters: np.ndarray | None,
    subsets: Sequence[tuple[str, np.ndarray]],
    *,
    base: dict,
    metric: str,
    references: dict[str, np.ndarray] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict]:
    """One results-table row per subset: accuracy, cluster-bootstrap CI, n, and paired tests.

    ``subsets`` pairs a subset name with a boolean mask over items; ``base`` holds the columns shared
    by every row (model, benchmark, …). For each reference (per-item correctness aligned to
    ``correct``) a row gets ``delta_vs_<name>`` (accuracy difference, this model minus the reference)
    and ``p_vs_<name>`` (exact McNemar), and the row names the test in ``test``.
    """
    correct = _as_correctness(correct, "correct")
    references = references or {}
    for name, reference_correct in references.items():
        if len(reference_correct) != correct.size:
            raise ValueError(
                f"reference {name!r} has {len(reference_correct)} items, expected {correct.size} (aligned)"
            )
    rows = []
    for subset, mask in subsets:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        ci = bootstrap_ci(
            correct[mask], None if clusters is None else np.asarray(clusters)[mask],
            n_boot=n_boot, seed=seed, level=level,
        )
        row = {**base, "subset": subset, "metric": metric, "value": ci.value,
               "ci_low": ci.ci_low, "ci_high": ci.ci_high, "n": int(mask.sum())}
        for name, reference_correct in references.items():
            reference_subset = reference_correct[mask]
            row[f"delta_vs_{name}"] = float(correct[mask].mean() - reference_subset.mean())
            row[f"p_vs_{name}"] = mcnemar_exact(correct[mask], reference_subset)["p_value"]
        if references:
            row["test"] = MCNEMAR_TEST_NAME
        rows.append(row)
    return rows
