"""HNC pairwise accuracy: does the encoder score an image's positive caption above its hard negative?

A pair is correct when s(image, positive) > s(image, negative) strictly (a tie is a failure: a model
that cannot tell the captions apart has not passed). s is the cosine similarity of CLIP features.
Pairs come from the preprocessed Parquet shards, one row per (image, positive, negative).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from hnclip.data.hnc import PairTableError, read_pair_tables
from hnclip.evaluate.encode import Preprocess, encode_images, encode_texts
from hnclip.evaluate.stats import accuracy_rows, align_reference

PAIR_COLUMNS = (
    "image_id", "image_path", "positive", "negative", "type", "type_group", "positive_id", "negative_id",
)
# The identity of a pair across models: references are joined on it.
PAIR_KEY = ("image_id", "positive_id", "negative_id")
BENCHMARK = "hnc_test"
METRIC = "pairwise_accuracy"


def check_pair_columns(pairs: pd.DataFrame, source: str = "pairs") -> None:
    """Raise PairTableError naming ``source`` when a required column is missing."""
    missing = [column for column in PAIR_COLUMNS if column not in pairs.columns]
    if missing:
        raise PairTableError(f"{source} lacks columns {missing}; has {list(pairs.columns)}")


def read_pair_shards(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate HNC pair shards (Parquet), checking each one's columns (``hnclip.data.hnc.read_pair_tables``)."""
    return read_pair_tables(list(paths), required=PAIR_COLUMNS)


def image_paths_by_id(pairs: pd.DataFrame, image_root: str | os.PathLike | None = None) -> pd.Series:
    """One path per image id (relative paths resolved against ``image_root``), in first-seen order."""
    per_image = pairs[["image_id", "image_path"]].drop_duplicates()
    conflicting = per_image["image_id"].duplicated(keep=False)
    if conflicting.any():
        image_id = per_image.loc[conflicting, "image_id"].iloc[0]
        paths = per_image.loc[per_image["image_id"] == image_id, "image_path"].tolist()
        raise PairTableError(f"image {image_id!r} has several image_path values: {paths}")
    root = Path(image_root) if image_root is not None else None
    resolved = [
        str(root / path) if root is not None and not Path(path).is_absolute() else str(path)
        for path in per_image["image_path"]
    ]
    return pd.Series(resolved, index=per_image["image_id"].to_numpy(), name="image_path")


def pairwise_scores(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess: Preprocess,
    pairs_df: pd.DataFrame,
    *,
    batch_size: int = 64,
    text_batch_size: int | None = None,
    device: str | torch.device | None = None,
    image_root: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """A copy of ``pairs_df`` plus ``score_positive`` and ``score_negative``: s(image, caption).

    Each distinct image is encoded once, each distinct caption once (HNC repeats both a lot); the
    scores are dot products of the L2-normalised features. The model must already be on ``device``
    (default: its own device).
    """
    check_pair_columns(pairs_df)
    images = image_paths_by_id(pairs_df, image_root)
    image_features = encode_images(
        model, images.tolist(), preprocess, batch_size=batch_size, device=device,
        num_workers=num_workers, progress=progress,
    )
    captions = pd.unique(pd.concat([pairs_df["positive"], pairs_df["negative"]], ignore_index=True))
    caption_features = encode_texts(
        model, tokenizer, [str(c) for c in captions], batch_size=text_batch_size or 4 * batch_size,
        device=device, progress=progress,
    )
    image_rows = pd.Index(images.index).get_indexer(pairs_df["image_id"])
    caption_index = pd.Index(captions)
    per_pair_images = image_features[image_rows]
    scored = pairs_df.copy()
    for role in ("positive", "negative"):
        per_pair_captions = caption_features[caption_index.get_indexer(pairs_df[role])]
        scored[f"score_{role}"] = (per_pair_images * per_pair_captions).sum(dim=1).numpy().astype(np.float64)
    return scored


def pairwise_correctness(scored: pd.DataFrame) -> pd.DataFrame:
    """Per-pair results: the pair key, type, type_group, both scores and ``correct`` (strictly greater).

    This is what a later model is compared against (saved as Parquet beside the report).
    """
    needed = [*PAIR_KEY, "type", "type_group", "score_positive", "score_negative"]
    missing = [column for column in needed if column not in scored.columns]
    if missing:
        raise PairTableError(f"scored pairs lack columns {missing}: run pairwise_scores first")
    duplicated = scored.duplicated(list(PAIR_KEY))
    if duplicated.any():
        first = scored.loc[duplicated, list(PAIR_KEY)].iloc[0].to_dict()
        raise PairTableError(f"pair {first} appears more than once: pairs must be unique per key")
    per_pair = scored[needed].reset_index(drop=True).copy()
    per_pair["correct"] = per_pair["score_positive"] > per_pair["score_negative"]
    return per_pair


def pair_subsets(per_pair: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """Subsets of the report: all pairs, each type group (by name), each type (as ``type:<name>``).

    Types are prefixed because a type may share its group's name (HNC test's ``relation``).
    """
    subsets = [("all", np.ones(len(per_pair), dtype=bool))]
    for group in sorted(per_pair["type_group"].astype(str).unique()):
        subsets.append((group, (per_pair["type_group"].astype(str) == group).to_numpy()))
    for pair_type in sorted(per_pair["type"].astype(str).unique()):
        subsets.append((f"type:{pair_type}", (per_pair["type"].astype(str) == pair_type).to_numpy()))
    return subsets


def pairwise_accuracy_report(
    pairs_df_with_scores: pd.DataFrame,
    *,
    model: str,
    reference: Mapping[str, pd.DataFrame] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    benchmark: str = BENCHMARK,
) -> list[dict]:
    """Results-table rows of pairwise accuracy for 'all', each type group and each type.

    CIs resample images (clusters), since the pairs of one image are not independent. ``reference``
    maps a name (``baseline``, ``control``) to that model's per-pair results (``pairwise_correctness``
    output, or any frame with the pair key and ``correct``); each row then has ``delta_vs_<name>``
    (accuracy difference) and ``p_vs_<name>`` (exact McNemar on the same pairs).
    """
    per_pair = pairwise_correctness(pairs_df_with_scores)
    references = {
        name: align_reference(per_pair, frame, PAIR_KEY, name) for name, frame in (reference or {}).items()
    }
    return accuracy_rows(
        per_pair["correct"].to_numpy(),
        per_pair["image_id"].astype(str).to_numpy(),
        pair_subsets(per_pair),
        base={"model": model, "benchmark": benchmark},
        metric=METRIC,
        references=references,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
