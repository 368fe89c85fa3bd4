"""Training batches from the HNC Parquet shards, streamed from disk.

A batch is a pure function of (seed, step): ``BatchPlan`` picks its rows and ``BatchMaker`` turns them into tensors.
Images are read, decoded and transformed only for the batch that needs them (ahead of the step, in DataLoader worker
processes when the job has threads to spare); captions are tokenised once into a compact bank of token ids and
expanded to the model's int64 rows per batch. What stays in memory is a few numbers per image and per caption, so a
resumed run sees exactly the batches an uninterrupted run would have seen, at any scale.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from hnclip.data.hnc import read_pair_tables
from hnclip.loader import ImageFiles, Requests, read_in_order

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The training shards cannot make the requested batches; the message names the shard or setting."""


TRAINING_COLUMNS = ("image_id", "image_path", "positive", "negative", "type_group")


def read_shards(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The pair shards, in the given order, with only the columns training uses (``read_pair_tables``)."""
    if not paths:
        raise TrainingDataError("no training shards given")
    pairs = read_pair_tables(paths, columns=TRAINING_COLUMNS)
    if pairs.empty:
        raise TrainingDataError(f"no training pairs in {[str(p) for p in paths]}")
    return pairs


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after decoding Parquet and factorising strings back to the system.
    Otherwise the process holds it for the whole run: ~100 MB beyond the tables themselves at 192 k pairs
    (bench/train_memory.py), GBs at HNC's 8.2 M."""
    pa.default_memory_pool().release_unused()


class CachedImages:
    """Images decoded beforehand into one tensor: for sets small enough to keep (memory grows with their number)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @classmethod
    def decode(cls, files: ImageFiles, desc: str = "images") -> "CachedImages":
        """Every image of ``files`` read once, written straight into one tensor (no list of copies to stack)."""
        if not len(files):
            raise ValueError("no images to decode")
        tensor = None
        for i in tqdm(range(len(files)), desc=desc, mininterval=5):
            image = files.read(i)
            if tensor is None:
                tensor = torch.empty((len(files), *image.shape), dtype=image.dtype)
            tensor[i] = image
        return cls(tensor)

    def __len__(self) -> int:
        return len(self.tensor)

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        return self.tensor[torch.as_tensor(np.asarray(indices, dtype=np.int64))]


def load_image_tensors(paths: Sequence[str], transform: Callable, desc: str = "images") -> torch.Tensor:
    """Decode and transform every image at once: [n_images, 3, H, W] float32. Its memory grows with the number of
    images, so training streams them instead (``ImageFiles``); this is for small sets and benchmarks."""
    return CachedImages.decode(ImageFiles(paths, transform), desc=desc).tensor


@dataclass
class PairData:
    """Pairs indexed for batching: image index, positive and negative caption indices per row."""

    image_paths: list[str]
    captions: Sequence[str] | None  # distinct captions, in pandas' (Arrow) storage; None once tokenised
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
        release_arrow_memory()
        return cls(
            image_paths=list(first_path.to_numpy()),
            captions=captions,
            row_image=row_image,
            row_positive=caption_codes[:n].astype(np.int64),
            row_negative=caption_codes[n:].astype(np.int64),
            image_rows=[order[bounds[i] : bounds[i + 1]] for i in range(len(image_ids))],
            positive_captions=np.unique(caption_codes[:n]).astype(np.int64),
        )

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    def without_caption_text(self) -> "PairData":
        """The same index without the caption strings, for when they are tokenised: the text takes more memory than
        its tokens (~1 GB for HNC's 16 M captions) and batching needs only caption indices."""
        return dataclasses.replace(self, captions=None)


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


@dataclass(frozen=True)
class StepRows:
    """One step's rows for one rank: the images to read and the captions that go with them."""

    step: int
    images: np.ndarray     # [n] image index
    positives: np.ndarray  # [n] caption index
    hard: np.ndarray       # [n, K] caption indices
    extra: np.ndarray      # [n, M] caption indices


class BatchMaker:
    """Turns a plan's rows into tensors: images from files read on demand (or a decoded cache), captions from a
    compact token bank expanded to the model's int64 rows for this batch only."""

    def __init__(
        self,
        plan: BatchPlan,
        images: ImageFiles | CachedImages | torch.Tensor,
        captions: CaptionBank | torch.Tensor,
    ):
        self.plan = plan
        self.images = CachedImages(images) if isinstance(images, torch.Tensor) else images
        self.captions = captions if isinstance(captions, CaptionBank) else CaptionBank.from_tokens(captions)

    def rows(self, step: int, rank: int = 0, world_size: int = 1) -> StepRows:
        """The plan's rows of ``step``, cut to ``rank``'s contiguous share of the global batch."""
        images, positives, hard, extra = self.plan.rows(step)
        local = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
        return StepRows(step, images[local], positives[local], hard[local], extra[local])

    def assemble(self, rows: StepRows, images: torch.Tensor) -> Batch:
        """The batch of ``rows`` around its images, already read."""
        tokens = self.captions.take
        return Batch(
            images=images,
            texts=tokens(rows.positives),
            hard_negatives=tokens(rows.hard),
            extra_negatives=tokens(rows.extra) if rows.extra.shape[1] else None,
            image_ids=torch.from_numpy(rows.images),
        )

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """The batch of ``step`` for ``rank``, read here and now."""
        rows = self.rows(step, rank, world_size)
        return self.assemble(rows, self.images.take(rows.images))

    def stream(
        self, start: int, stop: int, rank: int = 0, world_size: int = 1, *, num_workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[Batch]:
        """The batches of steps ``start`` .. ``stop - 1`` in order, equal to ``batch(step, rank, world_size)``.

        The plan runs here; ``num_workers`` loader processes read each step's images ahead of it (0 = read here, when
        the step asks). Closing the generator stops the workers.
        """
        requests = Requests(lambda: self._step_requests(start, stop, rank, world_size), length=max(0, stop - start))
        for rows, images in read_in_order(self.images, requests, num_workers=num_workers, pin_memory=pin_memory):
            yield self.assemble(rows, images)

    def _step_requests(self, start: int, stop: int, rank: int, world_size: int) -> Iterator[tuple[StepRows, Any]]:
        for step in range(start, stop):
            rows = self.rows(step, rank, world_size)
            yield rows, rows.images


# ---- caption tokens ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionBank:
    """Token ids of every caption, each trimmed after its last non-zero id and stored end to end in the smallest
    integer type that holds the vocabulary (uint16 for CLIP's 49,408 ids): ~2 bytes a token instead of 8 x context.

    ``take`` gives the model's [..., context] int64 rows back, zero-padded exactly as the tokenizer made them.
    """

    tokens: np.ndarray   # [total tokens] uint16 / int32 / int64
    offsets: np.ndarray  # [n + 1] int64: caption i is tokens[offsets[i] : offsets[i + 1]]
    context_length: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.offsets.nbytes

    @classmethod
    def from_tokens(cls, rows: torch.Tensor | np.ndarray) -> "CaptionBank":
        """The bank of token rows [n, context] as a tokenizer returns them."""
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"token rows must be [n, context], not shape {rows.shape}")
        lengths = _lengths_without_trailing_zeros(rows)
        kept = rows[np.arange(rows.shape[1]) < lengths[:, None]]  # row by row, in order
        return cls(
            tokens=kept.astype(_smallest_id_type(kept)),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            context_length=rows.shape[1],
        )

    @classmethod
    def tokenize(cls, tokenizer: Callable, captions: Sequence[str], chunk: int = 4096) -> "CaptionBank":
        """Tokenise every caption once, ``chunk`` at a time, so no [n, context] int64 table is ever whole."""
        parts = [cls.from_tokens(tokenizer(list(captions[i : i + chunk]))) for i in range(0, len(captions), chunk)]
        if not parts:
            return cls(np.zeros(0, np.uint16), np.zeros(1, np.int64), int(getattr(tokenizer, "context_length", 0)))
        return cls.concatenate(parts)

    @classmethod
    def concatenate(cls, banks: Sequence["CaptionBank"]) -> "CaptionBank":
        widths = {bank.context_length for bank in banks}
        if len(widths) != 1:
            raise ValueError(f"caption banks of different context lengths {sorted(widths)} cannot be joined")
        ends = np.cumsum([0] + [bank.offsets[-1] for bank in banks[:-1]])
        return cls(
            tokens=np.concatenate([bank.tokens for bank in banks]),  # the widest id type of the parts
            offsets=np.concatenate([[0]] + [bank.offsets[1:] + end for bank, end in zip(banks, ends)]).astype(np.int64),
            context_length=widths.pop(),
        )

    def take(self, index: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Token rows of the captions ``index`` (any shape): int64 [*index.shape, context]."""
        index = np.asarray(index, dtype=np.int64)
        flat = index.reshape(-1)
        starts = self.offsets[flat]
        lengths = self.offsets[flat + 1] - starts
        columns = np.arange(self.context_length)
        inside = columns < lengths[:, None]
        rows = np.zeros((len(flat), self.context_length), dtype=np.int64)
        rows[inside] = self.tokens[(starts[:, None] + columns)[inside]]
        return torch.from_numpy(rows).reshape(*index.shape, self.context_length)


def _lengths_without_trailing_zeros(rows: np.ndarray) -> np.ndarray:
    nonzero = rows != 0
    last = rows.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int64)


def _smallest_id_type(ids: np.ndarray) -> type:
    if ids.size == 0:
        return np.uint16
    low, high = int(ids.min()), int(ids.max())
    for kind in (np.uint16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return kind
    return np.int64


def tokenize_all(tokenizer: Callable, captions: Sequence[str], chunk: int = 4096) -> torch.Tensor:
    """Tokenise every caption at once: [n_captions, context_length] int64. Small sets only (validation,
    benchmarks); training keeps its captions in a ``CaptionBank``."""
    parts = [tokenizer(list(captions[i : i + chunk])) for i in range(0, len(captions), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
