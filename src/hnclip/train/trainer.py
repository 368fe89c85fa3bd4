"""The training recipe: one class of small methods (setup, train, step, validate, checkpoint).

It serves both the demo's baseline pre-training (plain CLIP loss on positives) and every grid cell's fine-tuning
(the seed's hard-negative loss), on CPU or CUDA, single process or torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hnclip.io import atomic_path
from hnclip.loader import ImageFiles, default_loader_workers, image_batches
from hnclip.losses import hard_negative_accuracy, hnc_contrastive_loss, plain_clip_loss
from hnclip.models import encode_image_with_patches, penultimate_patch_tokens
from hnclip.regularisers import alpha_at_step, feature_anchor, l2_sp
from hnclip.train import distributed
from hnclip.train.checkpoint import load_state, save_state
from hnclip.train.data import (
    Batch, BatchMaker, BatchPlan, CachedImages, CaptionBank, PairData, release_arrow_memory, tokenize_all,
)
from hnclip.train.microbatch import micro_batched_backward, set_activation_checkpointing
from hnclip.train.objectives import (
    TEACHER_TERMS, add_teacher_terms, frozen_teacher, needs_teacher_captions, uses_teacher,
)
from hnclip.train.text import encode_text_by_length

log = logging.getLogger(__name__)

# loss: the weighted total minimised (hnclip.train.objectives); image_to_text, text_to_image: the contrastive loss's
# two directions; l2_sp and the teacher terms: each unweighted, empty when off
LOG_COLUMNS = [
    "step", "epoch", "loss", "image_to_text", "text_to_image", "l2_sp", *TEACHER_TERMS, "alpha", "lr",
    "samples_per_s", "hard_negative_accuracy", "val_pairwise_accuracy",
]


class Preempted(RuntimeError):
    """SLURM asked the job to stop (SIGTERM/SIGUSR1); the resume state was saved at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signum} after step {step}; resume state saved, rerun to continue")
        self.step = step


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int
    tau: float
    alpha: float = 0.0
    loss: str = "hnc"  # "hnc" (the seed's loss) or "clip" (plain CLIP loss, demo baseline)
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 1.0
    train_towers: str = "both"
    hard_negatives_per_image: int = 1
    extra_random_negatives: int = 0
    val_every: int = 100
    val_pairs: int = 500
    checkpoint_every: int = 100
    # rows per micro-batch (None: the whole batch at once); the loss and gradient stay the whole batch's (GradCache)
    micro_batch_size: int | None = None
    grad_checkpointing: bool = False  # recompute each block's activations in backward: memory for compute
    # Objectives beside the seed's loss (hnclip.regularisers); the defaults leave the seed's training as it was.
    alpha_ramp_steps: int = 0  # alpha rises linearly over the first K steps (0: alpha from the start)
    l2_sp_weight: float = 0.0  # weight of the squared distance of the trainable parameters to their initial values
    train_last_n: int | None = None  # train only the last N blocks of each trained tower (and what follows them)
    freeze_projections: bool = False  # keep the towers' output projections as they are
    # Against a frozen copy of the starting weights (the baseline), which runs without a graph:
    distillation_weight: float = 0.0  # KL of the baseline's image->text distribution to the student's
    feature_anchor_weight: float = 0.0  # squared distance of the penultimate patch features (what LLaVA reads)
    preference_mix: float = 0.0  # loss = (1 - m) contrastive + m preference (DPO-style, over hard-negative triples)
    preference_beta: float | None = None  # the preference loss's beta (None: 1 / tau, the contrastive logits' scale)

    def __post_init__(self):
        if not 0.0 <= self.preference_mix <= 1.0:
            raise ValueError(f"preference_mix must lie in [0, 1], got {self.preference_mix}")
        if self.loss != "hnc" and uses_teacher(self):
            raise ValueError(f"distillation, the feature anchor and the preference loss need loss='hnc', got "
                             f"{self.loss!r}")


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup to ``lr``, then cosine decay to 0 at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * settings.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


# open_clip's parameter names: each tower's blocks, and the projections that map a tower's output to the joint space.
VISION_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
TEXT_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
PROJECTIONS = ("visual.proj", "text_projection")
TOWERS = ("both", "vision", "text")


def _block_counts(names: list[str]) -> dict[str, int]:
    counts = {"vision": 0, "text": 0}
    for name in names:
        for tower, pattern in (("vision", VISION_BLOCK), ("text", TEXT_BLOCK)):
            if match := pattern.match(name):
                counts[tower] = max(counts[tower], int(match.group(1)) + 1)
    return counts


def _before_last_blocks(name: str, counts: dict[str, int], last_n: int) -> bool:
    """Whether ``name`` lies before its tower's last ``last_n`` blocks (embeddings and earlier blocks)."""
    for tower, pattern in (("vision", VISION_BLOCK), ("text", TEXT_BLOCK)):
        if match := pattern.match(name):
            return int(match.group(1)) < counts[tower] - last_n
    stem = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre",
            "token_embedding", "positional_embedding")
    return name.startswith(stem)


def trainable_parameters(
    model: torch.nn.Module, towers: str, *, last_n: int | None = None, freeze_projections: bool = False,
) -> list[torch.nn.Parameter]:
    """Freeze what must not train: the temperature always (tau is fixed per cell), the tower ``towers`` leaves out
    ("both", "vision" or "text"), with ``last_n`` everything before each trained tower's last N blocks, with
    ``freeze_projections`` the projections."""
    if towers not in TOWERS:
        raise ValueError(f"train_towers must be one of {', '.join(TOWERS)}, got {towers!r}")
    if towers == "text":
        log.warning("train_towers = text leaves the vision tower, all that LLaVA reads, as it was: the LLaVA "
                    "evaluation will see the baseline's features")
    names = [name for name, _ in model.named_parameters()]
    counts = _block_counts(names)
    if last_n is not None and not 1 <= last_n <= min(c for c in counts.values() if c):
        raise ValueError(f"train_last_n must be between 1 and the towers' block count {counts}, got {last_n}")
    if last_n == 1 and towers in ("both", "vision"):
        log.warning("train_last_n = 1 trains only the vision tower's last block, whose output LLaVA never reads (it "
                    "takes the penultimate layer): the LLaVA evaluation will see the baseline's features")
    selected = []
    for name, parameter in model.named_parameters():
        vision = name.startswith("visual.")
        trained = not name.startswith("logit_") and (towers == "both" or (towers == "vision") == vision)
        if last_n is not None and _before_last_blocks(name, counts, last_n):
            trained = False
        if freeze_projections and name in PROJECTIONS:
            trained = False
        parameter.requires_grad_(trained)
        if trained:
            selected.append(parameter)
    return selected


# The demo's 6,000 images take 74 MB decoded and are each read ~30 times over its 3,000 baseline steps: decoding them
# once keeps it as fast as before. HNC's 67,807 images (92 GB) are read from disk per batch.
DEFAULT_IMAGE_CACHE_BYTES = 1 << 30


class Trainer:
    def __init__(
        self,
        settings: TrainSettings,
        model: torch.nn.Module,
        tokenizer: Callable,
        preprocess: Callable,
        train_pairs: pd.DataFrame,
        val_pairs: pd.DataFrame | None,
        state_dir: str | Path,
        device: str = "cpu",
        num_workers: int | None = None,
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
    ):
        """``num_workers``: processes that read images ahead of the step (None = ``default_loader_workers``,
        0 = read them in this process when the step asks). ``image_cache_bytes``: the training images are decoded
        once and kept when all of them fit in this many bytes, else read from disk per batch (0: always from disk)."""
        self.settings, self.model, self.device = settings, model.to(device), torch.device(device)
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.state_dir = Path(state_dir)
        self.log_path = self.state_dir / "train_log.csv"
        self.rank, self.world_size = distributed.rank_and_world()
        self.num_workers = default_loader_workers(self.device) if num_workers is None else num_workers
        self.image_cache_bytes = image_cache_bytes
        self._alpha = settings.alpha  # the hard-negative weight of the current step (alpha_ramp_steps)
        self._initial: list[torch.Tensor] | None = None  # L2-SP's anchor, set up by setup()
        self.teacher: torch.nn.Module | None = None  # the frozen starting weights, set up by setup()
        self._teacher_features: dict | None = None  # the teacher's features of the current step's batch
        self._anchor_rank_share = 1.0  # see _set_anchor_rank_share
        self._stop_signal: int | None = None
        self._stream: Iterator[Batch] | None = None
        self._stream_step: int | None = None  # the step the open stream yields next

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> int:
        """Build data, optimizer and (when a state exists) resume; returns the first step to run."""
        torch.manual_seed(self.settings.seed)
        self._setup_data()
        s = self.settings
        self.parameters = trainable_parameters(self.model, s.train_towers, last_n=s.train_last_n,
                                               freeze_projections=s.freeze_projections)
        # L2-SP's anchor: the weights the run starts from, taken before a resume loads later ones
        self._initial = [p.detach().clone() for p in self.parameters] if s.l2_sp_weight > 0 else None
        self.teacher = frozen_teacher(self.model) if uses_teacher(s) else None  # likewise before a resume
        if self.settings.grad_checkpointing:
            set_activation_checkpointing(self.model)
        # the fused kernel: 5x faster than the per-tensor loop on the CPU, and on CUDA too
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=self.settings.lr, weight_decay=self.settings.weight_decay, fused=True
        )
        meta = load_state(self.state_dir, self.model, self.optimizer)
        start = 0 if meta is None else int(meta["step"])
        if meta is not None:
            log.info("resuming from %s at step %d", self.state_dir, start)
        self._truncate_log(start)
        return start

    def _setup_data(self) -> None:
        s = self.settings
        data = PairData.from_pairs(self.train_pairs)
        log.info("train: %d pairs on %d images, %d captions", len(self.train_pairs), data.n_images, len(data.captions))
        captions = CaptionBank.tokenize(self.tokenizer, data.captions)
        data = data.without_caption_text()
        log.info("caption tokens: %.1f MB (%s ids)", captions.nbytes / 1e6, captions.tokens.dtype)
        plan = BatchPlan(data, s.batch_size, s.seed, s.hard_negatives_per_image, s.extra_random_negatives)
        self.batches = BatchMaker(plan, self._training_images(data.image_paths), captions)
        self.val = self._setup_validation() if self.val_pairs is not None else None
        self._release_pair_tables()

    def _training_images(self, paths: list[str]) -> ImageFiles | CachedImages:
        """Decoded once and kept if they all fit in ``image_cache_bytes``, else read from disk per batch."""
        files = ImageFiles(paths, self.preprocess)
        needed = files.decoded_bytes()
        if needed > self.image_cache_bytes:
            log.info("train images: %.0f MB decoded, over the %.0f MB cache: read per batch by %d loader workers",
                     needed / 1e6, self.image_cache_bytes / 1e6, self.num_workers)
            return files
        log.info("train images: %.0f MB decoded, kept in memory", needed / 1e6)
        return CachedImages.decode(files, desc="train images")

    def _release_pair_tables(self) -> None:
        """Once indexed, tokenised and sampled, the pair tables are dead weight for the rest of the run (GBs at
        8.2 M pairs); ``setup`` runs once."""
        self.train_pairs = self.val_pairs = None
        release_arrow_memory()

    def _setup_validation(self) -> dict:
        """A fixed subset of val pairs (independent of the cell's seed, so every cell is validated alike)."""
        pairs = self.val_pairs
        if len(pairs) > self.settings.val_pairs:
            pairs = pairs.sample(n=self.settings.val_pairs, random_state=0)
        image_codes, image_ids = pd.factorize(pairs["image_id"])
        paths = pairs.groupby(image_codes, sort=True)["image_path"].first().tolist()
        return {
            "images": ImageFiles(paths, self.preprocess),  # read a batch at a time by validate()
            "image_index": torch.from_numpy(image_codes.astype(np.int64)),
            "positive": tokenize_all(self.tokenizer, pairs["positive"].tolist()),
            "negative": tokenize_all(self.tokenizer, pairs["negative"].tolist()),
        }

    # ---- training ----------------------------------------------------------------------------------------------
    def train(self) -> None:
        start = self.setup()
        self._install_signal_handlers()
        progress = tqdm(range(start, self.settings.steps), initial=start, total=self.settings.steps,
                        desc="train", mininterval=10, disable=self.rank != 0)
        saved_step = start if start else None  # the step of the state on disk
        try:
            for step in progress:
                row = self.step(step)
                if (step + 1) % self.settings.val_every == 0 or step + 1 == self.settings.steps:
                    row["val_pairwise_accuracy"] = self.validate()
                self._append_log(row)
                if (step + 1) % self.settings.checkpoint_every == 0 or self._stop_signal is not None:
                    self.save_checkpoint(step + 1)
                    saved_step = step + 1
                if self._stop_signal is not None:
                    raise Preempted(step + 1, self._stop_signal)
        finally:
            self.close_stream()
        if saved_step != self.settings.steps:  # the full model and optimizer state: GBs at real size, written once
            self.save_checkpoint(self.settings.steps)

    def step(self, step: int) -> dict:
        s = self.settings
        started = time.perf_counter()
        lr = learning_rate(step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self._batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        self._alpha = alpha_at_step(s.alpha, step + 1, ramp_steps=s.alpha_ramp_steps)
        self._teacher_features = self._teach(batch)
        if s.feature_anchor_weight > 0:
            self._set_anchor_rank_share(batch)
        loss, parts, features = self._forward_backward(batch)
        parts["l2_sp"] = self._l2_sp_backward()
        distributed.average_gradients(self.parameters)
        torch.nn.utils.clip_grad_norm_(self.parameters, s.grad_clip)
        self.optimizer.step()
        elapsed = time.perf_counter() - started
        return {
            "step": step + 1,
            "epoch": self.batches.plan.epoch_of(step),
            "loss": float(loss) + (0.0 if parts["l2_sp"] is None else s.l2_sp_weight * parts["l2_sp"]),
            "image_to_text": float(parts["image_to_text"].detach()),
            "text_to_image": float(parts["text_to_image"].detach()),
            **{term: _logged(parts.get(term)) for term in ("l2_sp", *TEACHER_TERMS)},
            "alpha": self._alpha if s.loss == "hnc" else "",
            "lr": lr,
            "samples_per_s": s.batch_size / elapsed,
            "hard_negative_accuracy": self._hard_negative_accuracy(features),
            "val_pairwise_accuracy": "",
        }

    def _forward_backward(self, batch: Batch) -> tuple[float, dict, dict]:
        """The batch's weighted loss, its parts and features; the gradients accumulate in ``.grad``. With
        ``micro_batch_size`` only that many rows hold an autograd graph at once, and the loss is still the whole
        batch's (every row's denominator holds all of the batch's captions and hard negatives)."""
        s = self.settings
        anchored = s.feature_anchor_weight > 0
        if s.micro_batch_size is None:
            with self._autocast():
                features = self._encode_batch(batch, self.model, with_patches=anchored)
                loss, parts = self._loss(features)
                if anchored:
                    parts["feature_anchor"] = feature_anchor(features.pop("patches"),
                                                             self._teacher_features["patches"])
                    loss = loss + s.feature_anchor_weight * self._anchor_rank_share * parts["feature_anchor"]
            loss.backward()
            return float(loss.detach()), {key: value.detach() for key, value in parts.items()}, features
        result = micro_batched_backward(
            images=batch.images, texts=batch.texts,
            hard_negatives=batch.hard_negatives if self._uses_hard_negatives else None,
            extra_negatives=batch.extra_negatives, image_ids=batch.image_ids,
            encode_images=self._image_encoder(anchored),
            encode_texts=lambda tokens: encode_text_by_length(self.model, tokens),
            loss_from_features=self._loss, micro_batch_size=s.micro_batch_size, forward_context=self._autocast,
            image_penalty=self._anchor_share if anchored else None,
        )
        loss, parts = float(result.loss), dict(result.parts)
        if anchored:
            parts["feature_anchor"] = result.penalty / (s.feature_anchor_weight * self._anchor_rank_share)
            loss += float(result.penalty)
        return loss, parts, result.features

    def _image_encoder(self, with_patches: bool) -> Callable:
        if with_patches:
            return lambda images: encode_image_with_patches(self.model, self._to_device(images))
        return lambda images: self.model.encode_image(self._to_device(images))

    def _anchor_share(self, patches: torch.Tensor, rows: slice) -> torch.Tensor:
        """The weighted feature anchor of one micro-batch's rows, as their share of the rank's mean over rows (times
        ``_rank_share``)."""
        reference = self._teacher_features["patches"][rows]
        share = feature_anchor(patches, reference) * (reference.shape[0] / len(self._teacher_features["patches"]))
        return self.settings.feature_anchor_weight * self._anchor_rank_share * share

    def _set_anchor_rank_share(self, batch: Batch) -> None:
        """world size x this rank's share of the global rows: each rank's anchor is the mean over its own rows, and
        averaging the gradients over ranks then weighs every image of the global batch alike, even when the rows
        do not split evenly. 1 in one process."""
        rows = len(batch.image_ids)
        self._anchor_rank_share = self.world_size * rows / distributed.global_count(rows, self.device)

    def _teach(self, batch: Batch) -> dict | None:
        """The frozen baseline's features of the batch (None without a teacher term): what distillation and the
        preference loss compare with (gathered over ranks, like the student's) and the penultimate patches the
        feature anchor compares with (this rank's rows). No graph, and the whole batch in one pass: without a
        graph only one layer's activations are alive at a time."""
        if self.teacher is None:
            return None
        s = self.settings
        with torch.no_grad(), self._autocast():
            if not needs_teacher_captions(s):  # the anchor alone: the blocks up to the penultimate layer suffice
                return {"patches": penultimate_patch_tokens(self.teacher, self._to_device(batch.images))}
            return self._encode_batch(batch, self.teacher, with_patches=s.feature_anchor_weight > 0)

    def _l2_sp_backward(self) -> float | None:
        """Add L2-SP's gradient (weighted) to the step's; returns the unweighted distance, None when it is off."""
        if self._initial is None:
            return None
        distance = l2_sp(self.parameters, self._initial)
        (self.settings.l2_sp_weight * distance).backward()
        return float(distance.detach())

    @property
    def _uses_hard_negatives(self) -> bool:
        # the plain CLIP loss (demo baseline) and alpha = 0 (the control) give hard negatives no weight: do not pay
        # to encode them, unless the preference loss ranks them or distillation matches them (at every alpha, so
        # that a distilled control matches the same distribution as the distilled cells beside it)
        s = self.settings
        return s.loss == "hnc" and (s.alpha > 0 or s.preference_mix > 0 or s.distillation_weight > 0)

    def _batch(self, step: int) -> Batch:
        """The step's batch, from a stream whose loader workers read the next steps' images meanwhile (pinned on a
        GPU, so the copy to the card is asynchronous and the card never waits for the host).

        A batch is a pure function of the step, so where the stream starts never changes what a step sees: it opens
        at the first step asked for (0, or the resumed step) and again whenever a caller jumps to another step.
        """
        if self._stream is None or self._stream_step != step:
            self._open_stream(step)
        batch = next(self._stream)
        self._stream_step = step + 1
        return batch

    def _open_stream(self, step: int) -> None:
        self.close_stream()
        self._stream = self.batches.stream(
            step, max(step + 1, self.settings.steps), self.rank, self.world_size,
            num_workers=self.num_workers, pin_memory=self._pins_memory,
        )
        self._stream_step = step

    def close_stream(self) -> None:
        """Stop the loader workers (they would otherwise wait, holding read-ahead batches, until the process ends)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._stream_step = None, None

    @property
    def _pins_memory(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        # pinned (on a GPU): the copy runs asynchronously instead of blocking the host
        return images.to(self.device, non_blocking=images.is_pinned())

    def _encode_batch(self, batch, model: torch.nn.Module, *, with_patches: bool = False) -> dict[str, torch.Tensor]:
        """Encode every text of the batch in one call, then gather all ranks' rows (with gradient). With
        ``with_patches`` also this rank's penultimate patch tokens (key ``patches``, not gathered)."""
        features: dict = {"ids": distributed.gather_with_grad(batch.image_ids.to(self.device))}
        images = self._to_device(batch.images)
        if with_patches:
            image_features, features["patches"] = encode_image_with_patches(model, images)
        else:
            image_features = model.encode_image(images)
        features["image"] = distributed.gather_with_grad(image_features)
        features.update(self._encode_captions(batch, model))
        return features

    def _encode_captions(self, batch, model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
        n = batch.texts.shape[0]
        k = batch.hard_negatives.shape[1] if self._uses_hard_negatives else 0
        m = 0 if batch.extra_negatives is None else batch.extra_negatives.shape[1]
        texts = [batch.texts, batch.hard_negatives[:, :k].flatten(0, 1)]
        if m:
            texts.append(batch.extra_negatives.flatten(0, 1))
        text_features = encode_text_by_length(model, torch.cat(texts))
        gather = distributed.gather_with_grad
        return {
            "text": gather(text_features[:n]),
            "hard": gather(text_features[n : n + n * k].reshape(n, k, -1)) if k else None,
            "extra": gather(text_features[n + n * k :].reshape(n, m, -1)) if m else None,
        }

    @staticmethod
    def _hard_negative_accuracy(features: dict) -> float | str:
        if features["hard"] is None:
            return ""
        return float(hard_negative_accuracy(features["image"], features["text"], features["hard"]))

    def _loss(self, f: dict) -> tuple[torch.Tensor, dict]:
        """The weighted loss of the features (the contrastive loss and the teacher terms on features) and its
        parts."""
        return add_teacher_terms(self._contrastive_parts(f), f, self._teacher_features, self.settings)

    def _contrastive_parts(self, f: dict) -> dict:
        common = dict(tau=self.settings.tau, image_ids=f["ids"], return_parts=True)
        if f["hard"] is not None:
            parts = hnc_contrastive_loss(
                f["image"], f["text"], f["hard"], alpha=self._alpha, extra_negative_features=f["extra"], **common
            )
        elif f["extra"] is not None:  # alpha = 0 with random negatives, which weigh 1 like in-batch negatives
            parts = hnc_contrastive_loss(f["image"], f["text"], f["extra"], alpha=1.0, **common)
        else:  # the plain CLIP loss: the demo baseline, or alpha = 0 (the HNC term is exactly absent)
            parts = plain_clip_loss(f["image"], f["text"], **common)
        return parts

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def validate(self) -> float:
        """Pairwise accuracy on the fixed val subset: s(image, positive) > s(image, negative)."""
        if self.val is None:
            return float("nan")
        self.model.eval()
        with self._autocast():
            images = self._encode_normalised_val_images()
            positive = self._encode_normalised_text(self.val["positive"])
            negative = self._encode_normalised_text(self.val["negative"])
        self.model.train()
        image = images[self.val["image_index"].to(self.device)]
        correct = (image * positive).sum(-1) > (image * negative).sum(-1)
        return float(correct.float().mean())

    def _encode_normalised_val_images(self) -> torch.Tensor:
        """Features of the val images, read and encoded a training batch at a time (a size the card is known to hold),
        so no more than a batch of images is ever in memory."""
        batches = image_batches(self.val["images"], self.settings.batch_size, num_workers=self.num_workers,
                                pin_memory=self._pins_memory)
        with contextlib.closing(batches):  # an error while encoding must not leave the loader's workers waiting
            return torch.cat([torch.nn.functional.normalize(self.model.encode_image(self._to_device(images)), dim=-1)
                              for images in batches])

    def _encode_normalised_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(encode_text_by_length(self.model, tokens), dim=-1)

    # ---- checkpoint, log, signals -------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        if self.rank == 0:
            save_state(self.state_dir, self.model, self.optimizer, step)
            log.info("saved resume state at step %d", step)

    def _append_log(self, row: dict) -> None:
        if self.rank != 0:
            return
        new = not self.log_path.exists()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if row["step"] % 50 == 0 or row["val_pairwise_accuracy"] != "":
            log.info("step %d loss %.4f lr %.2e %.0f samples/s hn-acc %s val %s", row["step"], row["loss"],
                     row["lr"], row["samples_per_s"], row["hard_negative_accuracy"], row["val_pairwise_accuracy"])

    def _truncate_log(self, start: int) -> None:
        """Drop log rows past the resumed step: they belong to work that is about to be redone."""
        if self.rank != 0 or not self.log_path.exists():
            return
        if start == 0:
            self.log_path.unlink()
            return
        with open(self.log_path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= start]
        with atomic_path(self.log_path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            log.warning("signal %d received: saving state after this step", signum)
            self._stop_signal = signum

        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, request_stop)


def _logged(value) -> float | str:
    """A term's log cell: its value, or empty when the term is off."""
    if value is None:
        return ""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
