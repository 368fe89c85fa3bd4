"""Feature drift of a fine-tuned tower against the baseline, where LLaVA reads it.

LLaVA-1.5 feeds its projector the patch tokens of the vision tower's penultimate layer (the input of the
last residual block, CLS dropped), never the final LayerNorm or projection. If fine-tuning moves those
features far, the unchanged projector sees inputs it was not trained on. Two measures on a fixed
image sample: the mean cosine similarity of corresponding tokens, and linear CKA (Kornblith et al.,
2019) over the tokens × features matrices, which ignores rotations and isotropic rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hnclip.evaluate.encode import (
    ImageSource, Preprocess, evaluation_mode, model_device, preprocessed_batches,
)
from hnclip.evaluate.stats import bootstrap_ci
from hnclip.models import penultimate_patch_tokens

BENCHMARK = "drift"


class DriftInputError(ValueError):
    """The two towers or their features cannot be compared (shapes differ, features are constant …)."""


# --- linear CKA -----------------------------------------------------------------------------------

def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA of two row-aligned matrices (n rows × d1, n rows × d2), columns centred.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F · ||Yc^T Yc||_F), computed in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise DriftInputError(
            f"CKA needs two matrices with the same number of rows, got {x.shape} and {y.shape}"
        )
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return _cka_from_cross_products(x.T @ x, y.T @ y, x.T @ y)


def _cka_from_cross_products(xtx: np.ndarray, yty: np.ndarray, xty: np.ndarray) -> float:
    denominator = np.linalg.norm(xtx) * np.linalg.norm(yty)
    if denominator == 0.0:
        raise DriftInputError("CKA is undefined: one of the feature matrices is constant over its rows")
    return float(np.linalg.norm(xty) ** 2 / denominator)


class LinearCKAAccumulator:
    """Linear CKA over row blocks fed one batch at a time, without keeping the rows.

    Keeps X^T X, Y^T Y, X^T Y and the column sums (float64); centring is applied at the end through
    Xc^T Yc = X^T Y - n · mean_x mean_y^T. Memory is O(d^2) however many tokens are fed.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._sums: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise DriftInputError(
                f"CKA blocks must be row-aligned matrices, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        x, y = x.double(), y.double()
        for name, value in (("xtx", x.T @ x), ("yty", y.T @ y), ("xty", x.T @ y),
                            ("sum_x", x.sum(dim=0)), ("sum_y", y.sum(dim=0))):
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self.rows += x.shape[0]

    def value(self) -> float:
        if self.rows == 0:
            raise DriftInputError("CKA accumulator has seen no rows")
        s = {name: tensor.cpu().numpy() for name, tensor in self._sums.items()}
        n = float(self.rows)
        centred_xtx = s["xtx"] - np.outer(s["sum_x"], s["sum_x"]) / n
        centred_yty = s["yty"] - np.outer(s["sum_y"], s["sum_y"]) / n
        centred_xty = s["xty"] - np.outer(s["sum_x"], s["sum_y"]) / n
        return _cka_from_cross_products(centred_xtx, centred_yty, centred_xty)


# --- drift measurement and report -----------------------------------------------------------------

@dataclass(frozen=True)
class DriftMeasurement:
    """Per-image mean token cosine (model vs baseline), CKA over all tokens, and the sample size."""

    per_image_cosine: np.ndarray
    cka: float
    tokens_per_image: int

    @property
    def n_images(self) -> int:
        return int(self.per_image_cosine.size)


def fixed_image_sample(images: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """A reproducible sample of ``n`` distinct images (all of them when fewer), in sorted order.

    Sorting first makes the sample independent of the order the caller listed the images in.
    """
    pool = sorted(set(map(str, images)))
    if n >= len(pool):
        return pool
    chosen = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(chosen)]


def measure_drift(
    model: torch.nn.Module,
    baseline: torch.nn.Module,
    preprocess: Preprocess,
    images: Sequence[ImageSource],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> DriftMeasurement:
    """Penultimate patch tokens of ``model`` vs ``baseline`` on the same preprocessed images.

    Each model runs on its own device; statistics accumulate on ``model``'s device in float64.
    """
    device = model_device(model)
    cka = LinearCKAAccumulator()
    cosines: list[torch.Tensor] = []
    with evaluation_mode(model), evaluation_mode(baseline):
        for batch in preprocessed_batches(
            images, preprocess, batch_size=batch_size, num_workers=num_workers, progress=progress,
            description="drift",
        ):
            tokens = penultimate_patch_tokens(model, batch.to(device)).double()
            baseline_batch = batch.to(model_device(baseline))
            reference = penultimate_patch_tokens(baseline, baseline_batch).to(device).double()
            if tokens.shape[:2] != reference.shape[:2]:
                raise DriftInputError(
                    f"model gives {tuple(tokens.shape)} penultimate tokens, baseline {tuple(reference.shape)}"
                )
            cosines.append(F.cosine_similarity(tokens, reference, dim=-1).mean(dim=1).cpu())
            cka.update(tokens.flatten(0, 1), reference.flatten(0, 1))
    if not cosines:
        raise DriftInputError("no images given for the drift measurement")
    return DriftMeasurement(torch.cat(cosines).numpy(), cka.value(), int(tokens.shape[1]))


def drift_report(
    measurement: DriftMeasurement,
    *,
    model: str,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict]:
    """Results-table rows: ``mean_cosine`` (bootstrap CI over images) and ``cka`` (no CI: one number
    over all tokens; a bootstrap would need per-image d×d cross products)."""
    cosine = bootstrap_ci(measurement.per_image_cosine, n_boot=n_boot, seed=seed, level=level)
    base = {"model": model, "benchmark": BENCHMARK, "subset": "all"}
    return [
        {**base, "metric": "mean_cosine", "value": cosine.value, "ci_low": cosine.ci_low,
         "ci_high": cosine.ci_high, "n": measurement.n_images},
        {**base, "metric": "cka", "value": measurement.cka, "ci_low": None, "ci_high": None,
         "n": measurement.n_images},
    ]
