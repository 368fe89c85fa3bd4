"""Training batches from the HNC Parquet shards.

Everything a step needs is prepared once: images are decoded and transformed once into a tensor cache, captions
are tokenised once into a tensor bank, and a batch is a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The training shards cannot make the requested batches; the message names the shard or setting."""


def read_shards(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate pair shards, in the given order, keeping only the columns training uses."""
    columns = ["image_id", "image_path", "positive", "negative", "type_group"]
    frames = [pd.read_parquet(p, columns=columns) for p in paths]
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    if pairs.empty:
        raise TrainingDataError(f"no training pairs in {[str(p) for p in paths]}")
    return pairs


def load_image_tensors(paths: Sequence[str], transform: Callable, desc: str = "images") -> torch.Tensor:
    """Decode and transform every image once: [n_images, 3, H, W] float32."""
    tensors = []
    for path in tqdm(paths, desc=desc, mininterval=5):
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors)


@dataclass
class PairData:
    """Pairs indexed for batching: image index, positive and negative caption indices per row."""

    image_paths: list[str]
    captions: list[str]
    row_image: np.ndarray       # [rows] image index of each pair
    row_positive: np.ndarray    # [rows] caption index of the positive
    row_negative: np.ndarray    # [rows] caption index of the hard negative
    image_rows: list[np.ndarray]  # rows of each image
    positive_captions: np.ndarray  # caption indices that are some image's positive (pool of random negatives)

    @classmethod
    def from_pairs(cls, pairs: pd.DataFrame) -> "PairData":
        image_codes, image_ids = pd.factorize(pairs["image_id"], sort=False)
        first_path = pairs.groupby(image_codes, sort=True)["image_path"].first()
        caption_codes, captions = pd.factorize(pd.concat([pairs["positive"], pairs["negative"]]), sort=False)
        n = len(pairs)
        row_image = image_codes.astype(np.int64)
        order = np.argsort(row_image, kind="stable")
        bounds = np.searchsorted(row_image[order], np.arange(len(image_ids) + 1))
        return cls(
            image_paths=list(first_path.to_numpy()),
            captions=list(captions),
            row_image=row_image,
            row_positive=caption_codes[:n].astype(np.int64),
            row_negative=caption_codes[n:].astype(np.int64),
            image_rows=[order[bounds[i] : bounds[i + 1]] for i in range(len(image_ids))],
            positive_captions=np.unique(caption_codes[:n]).astype(np.int64),
        )

    @property
    def n_images(self) -> int:
        return len(self.image_paths)


@dataclass
class Batch:
    images: torch.Tensor          # [N, 3, H, W]
    texts: torch.Tensor           # [N, ctx] positives
    hard_negatives: torch.Tensor  # [N, K, ctx]
    extra_negatives: torch.Tensor | None  # [N, M, ctx]
    image_ids: torch.Tensor       # [N]


class BatchPlan:
    """Which rows form step ``step``'s batch: a pure function of (seed, step).

    Each epoch is a seeded permutation of the images cut into batches of ``batch_size`` distinct images; each image
    contributes one of its pairs, chosen by a generator seeded with (seed, step).
    """

    def __init__(self, data: PairData, batch_size: int, seed: int, k_hard: int = 1, m_extra: int = 0):
        if data.n_images < batch_size:
            raise TrainingDataError(
                f"finetune.batch_size={batch_size} needs at least that many distinct images; the shards hold "
                f"{data.n_images}"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.k_hard, self.m_extra = k_hard, m_extra
        self.batches_per_epoch = data.n_images // batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.data.n_images)

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image index, positive, hard negatives [N, K], extra negatives [N, M]) for one step."""
        epoch, position = divmod(step, self.batches_per_epoch)
        images = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        chosen = np.array([rng.choice(self.data.image_rows[i]) for i in images])
        positives = self.data.row_positive[chosen]
        hard = np.empty((len(images), self.k_hard), dtype=np.int64)
        hard[:, 0] = self.data.row_negative[chosen]
        for k in range(1, self.k_hard):
            # further negatives of the same image: all are false captions of that image
            hard[:, k] = [self.data.row_negative[rng.choice(self.data.image_rows[i])] for i in images]
        extra = self._extra_negatives(rng, positives)
        return images, positives, hard, extra

    def _extra_negatives(self, rng: np.random.Generator, positives: np.ndarray) -> np.ndarray:
        pool = self.data.positive_captions
        extra = rng.choice(pool, size=(len(positives), self.m_extra))
        clash = extra == positives[:, None]
        while clash.any():  # a row's own positive is never its random negative
            extra[clash] = rng.choice(pool, size=int(clash.sum()))
            clash = extra == positives[:, None]
        return extra


class BatchMaker:
    """Turns a plan's rows into tensors from the image cache and the caption bank."""

    def __init__(self, plan: BatchPlan, image_cache: torch.Tensor, caption_tokens: torch.Tensor):
        self.plan, self.image_cache, self.caption_tokens = plan, image_cache, caption_tokens

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        images, positives, hard, extra = self.plan.rows(step)
        local = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
        images, positives, hard, extra = images[local], positives[local], hard[local], extra[local]
        tokens = self.caption_tokens
        return Batch(
            images=self.image_cache[torch.from_numpy(images)],
            texts=tokens[torch.from_numpy(positives)],
            hard_negatives=tokens[torch.from_numpy(hard)],
            extra_negatives=tokens[torch.from_numpy(extra)] if extra.shape[1] else None,
            image_ids=torch.from_numpy(images),
        )


def tokenize_all(tokenizer: Callable, captions: Sequence[str], chunk: int = 4096) -> torch.Tensor:
    """Tokenise every caption once: [n_captions, context_length]."""
    parts = [tokenizer(list(captions[i : i + chunk])) for i in range(0, len(captions), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
