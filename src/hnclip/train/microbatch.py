"""Exact micro-batching of the contrastive loss (GradCache), for large batches on limited GPU memory.

A contrastive loss does not split into per-row terms: every row's denominator holds the whole batch's captions
(and here each image's hard and extra negatives), so plain gradient accumulation over micro-batches would shrink
the set of negatives and change the loss. GradCache (Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", the method behind open_clip_train's ``--accum-freq``) keeps the
whole batch's loss and gradient exactly while building an autograd graph for one micro-batch at a time:

1. Encode every image and caption of the batch without a graph, ``micro_batch_size`` rows at a time (a row is one
   image with its positive, its K hard negatives and its M extra negatives).
2. Compute the whole batch's loss on those cached features, made leaf tensors that require grad, and back-propagate
   it to the leaves: d loss / d feature for every cached feature. Only features are in this graph, no encoder.
3. For each micro-batch, encode its rows again, now with a graph, and back-propagate the cached feature gradients
   through the encoders (``torch.autograd.backward(features, grad_tensors=...)``). By the chain rule the parameter
   gradients summed over micro-batches are the whole batch's: d loss / d theta = sum_f (d loss / d f)(d f / d theta).

A term that is a sum over the rows of the image tower's own outputs (the feature anchor: each image's penultimate
features against the frozen baseline's) needs no cache: ``image_penalty`` computes each micro-batch's share from the
second output of ``encode_images`` in step 1 (its value) and again, with a graph, in step 3, where it joins the
micro-batch's backward.

The cost is one extra forward pass of both towers (step 3 repeats step 1 with a graph); the memory of the encoders'
activations is that of one micro-batch. ``set_activation_checkpointing`` cuts it further, per layer.

Exactness needs step 3 to reproduce step 1's features. The random number generator state (CPU, and the current CUDA
device's) is saved before each tower's encode in step 1 and restored before the same encode in step 3, so dropout,
should a model use it, draws the same masks in both passes. (The dropout masks then depend on the micro-batching,
as any change of batch shape does; the gradient is exact for the masks drawn.) What cannot be replayed is state a
forward pass writes, such as BatchNorm's running statistics: the ViT CLIP towers used here have none.

Under torchrun each rank passes its own rows. Step 2 makes the rank's LOCAL cached features the leaves and gathers
them with ``gather`` (``distributed.gather_with_grad`` by default), so every rank computes the same global loss; the
gathered tensors' graph reaches only the leaves, never an encoder. The all-gather's backward sums over ranks, which
leaves on each rank's leaves world_size x d loss / d (its own rows): exactly the gradient that the whole-batch path
(gather the encoders' outputs with grad, ``loss.backward()``) delivers to that rank's encoder outputs. Step 3 then
back-propagates only the rank's local rows, so each rank ends with the same ``.grad`` as the whole-batch path, and
``distributed.average_gradients`` (sum over ranks / world_size) gives the global gradient, as it does today. This is
"gather without grad, take the local rows of the global gradient, times world_size" without row offsets to track.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from hnclip.train import distributed

__all__ = ["MicroBatchedStep", "micro_batched_backward", "set_activation_checkpointing"]

Encoder = Callable[[torch.Tensor], torch.Tensor]
LossFromFeatures = Callable[[dict], "tuple[torch.Tensor, dict]"]
ImagePenalty = Callable[[torch.Tensor, slice], torch.Tensor]


@dataclass(frozen=True)
class MicroBatchedStep:
    """What one micro-batched forward+backward returns; every tensor is detached.

    ``loss`` and ``parts`` are what ``loss_from_features`` returned for the whole (global) batch; ``features`` holds
    the global features it saw, keys ``image``, ``text``, ``hard``, ``extra`` (None when not encoded) and ``ids``.
    ``penalty`` is the sum of ``image_penalty``'s shares over this rank's micro-batches (None without one); it is
    not part of ``loss``.
    """

    loss: torch.Tensor
    parts: dict
    features: dict
    penalty: torch.Tensor | None = None


@dataclass(frozen=True)
class _Rows:
    """One rank's row-aligned inputs: images [n, ...], positives [n, ctx], hard [n, K, ctx], extra [n, M, ctx]."""

    images: torch.Tensor
    texts: torch.Tensor
    hard: torch.Tensor | None
    extra: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.texts.shape[0]

    def captions_per_kind(self) -> dict[str, int]:
        """How many captions of each kind a row holds, in the order they are encoded (like the trainer does)."""
        counts = {"text": 1, "hard": 0, "extra": 0}
        if self.hard is not None:
            counts["hard"] = self.hard.shape[1]
        if self.extra is not None:
            counts["extra"] = self.extra.shape[1]
        return counts

    def caption_tokens(self, rows: slice) -> torch.Tensor:
        """All captions of ``rows`` in one tensor: positives, then hard negatives, then extra negatives."""
        parts = [self.texts[rows]]
        parts += [group[rows].flatten(0, 1) for group in (self.hard, self.extra) if group is not None]
        return torch.cat(parts)


@dataclass(frozen=True)
class _RngState:
    cpu: torch.Tensor
    cuda: torch.Tensor | None


def micro_batched_backward(
    *,
    images: torch.Tensor,
    texts: torch.Tensor,
    hard_negatives: torch.Tensor | None,
    extra_negatives: torch.Tensor | None,
    image_ids: torch.Tensor,
    encode_images: Encoder,
    encode_texts: Encoder,
    loss_from_features: LossFromFeatures,
    micro_batch_size: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    image_penalty: ImagePenalty | None = None,
) -> MicroBatchedStep:
    """The whole batch's loss and parameter gradients, with encoder graphs of ``micro_batch_size`` rows only.

    Gradients accumulate into ``.grad`` as ``loss.backward()`` of the whole batch would (zero them before, reduce
    them across ranks after, as usual); see the module docstring for the method and its use under torchrun.

    Args:
        images: [n, ...] this rank's images, passed to ``encode_images`` in row slices (may stay on the host).
        texts: [n, ctx] tokens of each image's positive caption.
        hard_negatives: [n, K, ctx] tokens of each image's hard negatives, or None (alpha = 0: not encoded).
        extra_negatives: [n, M, ctx] tokens of each image's extra random negatives, or None.
        image_ids: [n] integer ids; rows with equal ids are not each other's negatives (handled by the loss).
        encode_images: images slice -> [rows, D] features (e.g. ``model.encode_image`` after a device copy).
        encode_texts: [captions, ctx] tokens -> [captions, D] features (e.g. ``encode_text_by_length``).
        loss_from_features: dict with keys image [N, D], text [N, D], hard [N, K, D] or None, extra [N, M, D] or
            None, ids [N] (N = global rows) -> (scalar loss, parts dict); the trainer's ``_loss``.
        micro_batch_size: rows per micro-batch (>= 1); the last micro-batch holds the remainder.
        gather: concatenates every rank's rows (default ``distributed.gather_with_grad``: identity in one process).
        forward_context: makes the context each forward pass runs in (e.g. the trainer's ``_autocast``); the
            backward passes run outside it, as autocast recommends.
        image_penalty: a term over the image tower's rows, added to the gradient: ``encode_images`` then returns
            (features, side output) and ``image_penalty(side output, rows)`` gives the share of the micro-batch
            ``rows`` (a slice of this rank's rows), so that the shares sum to the rank's whole term.

    Raises:
        ValueError: micro_batch_size < 1 or not an integer; empty or row-misaligned inputs.
    """
    size = _checked_micro_batch_size(micro_batch_size)
    rows = _checked_rows(images, texts, hard_negatives, extra_negatives, image_ids)
    gather = distributed.gather_with_grad if gather is None else gather
    micro_batches = _micro_batches(rows.count, size)
    encoders = {"image": _ImageEncoder(encode_images, image_penalty), "text": encode_texts}

    local, rng_states, penalty = _encode_without_graph(rows, micro_batches, encoders, forward_context)
    ids = image_ids.to(local["image"].device)
    loss, parts, features, gradients = _feature_gradients(local, ids, loss_from_features, gather, forward_context)
    _backpropagate_micro_batches(rows, micro_batches, encoders, gradients, rng_states, forward_context)
    return MicroBatchedStep(loss=loss, parts=_detached(parts), features=features, penalty=penalty)


class _ImageEncoder:
    """The image tower as the passes call it: ``(rows' images, rows) -> (features, penalty share or None)``."""

    def __init__(self, encode: Encoder, penalty: ImagePenalty | None):
        self.encode, self.penalty = encode, penalty

    def __call__(self, images: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.penalty is None:
            return self.encode(images), None
        features, side = self.encode(images)
        return features, self.penalty(side, rows)


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool = True) -> None:
    """Turn open_clip's activation (gradient) checkpointing on or off in both towers.

    Each transformer block then keeps only its input and recomputes its activations during backward (open_clip's
    ``checkpoint(..., use_reentrant=False)``, which replays the RNG state): about one extra forward pass for
    activation memory of one block per layer. It covers the trainer's text path too, since
    ``encode_text_by_length`` calls the same ``model.transformer``. It composes with ``micro_batched_backward``,
    allowing larger micro-batches. open_clip_train's ``--grad-checkpointing`` makes the same call.

    Raises:
        TypeError: the model has no ``set_grad_checkpointing`` (not an open_clip model).
    """
    set_grad_checkpointing = getattr(model, "set_grad_checkpointing", None)
    if not callable(set_grad_checkpointing):
        raise TypeError(
            f"{type(model).__name__} has no set_grad_checkpointing(): activation checkpointing needs an open_clip model"
        )
    set_grad_checkpointing(bool(enabled))


# ---- step 1: encode the whole batch without a graph ------------------------------------------------------------------
def _encode_without_graph(
    rows: _Rows, micro_batches: list[slice], encoders: dict, forward_context
) -> tuple[dict[str, torch.Tensor | None], list[dict[str, _RngState]], torch.Tensor | None]:
    """Every row's features (image, text, hard, extra; rank-local), the RNG states of the pass and the image
    penalty's value (None without one).

    The states: before each micro-batch's image and text encodes, and (key ``"end"`` of the last) after the pass.
    """
    image_parts, caption_parts, rng_states, penalty = [], [], [], None
    for micro_batch in micro_batches:
        states = {}
        with torch.no_grad(), forward_context():
            states["image"] = _capture_rng_state()
            image_features, share = encoders["image"](rows.images[micro_batch], micro_batch)
            image_parts.append(image_features)
            if share is not None:
                penalty = share if penalty is None else penalty + share
            states["text"] = _capture_rng_state()
            caption_parts.append(
                _split_captions(encoders["text"](rows.caption_tokens(micro_batch)), rows, micro_batch)
            )
        rng_states.append(states)
    rng_states[-1]["end"] = _capture_rng_state()
    local = {"image": torch.cat(image_parts)}
    for kind in ("text", "hard", "extra"):
        pieces = [part[kind] for part in caption_parts]
        local[kind] = None if pieces[0] is None else torch.cat(pieces)
    return local, rng_states, penalty


def _split_captions(features: torch.Tensor, rows: _Rows, micro_batch: slice) -> dict[str, torch.Tensor | None]:
    """Undo ``_Rows.caption_tokens``: [b(1 + K + M), D] -> text [b, D], hard [b, K, D], extra [b, M, D]."""
    count = len(range(*micro_batch.indices(rows.count)))
    split, start = {}, 0
    for kind, per_row in rows.captions_per_kind().items():
        block = features[start : start + count * per_row]
        start += count * per_row
        if kind == "text":
            split[kind] = block
        else:
            split[kind] = block.reshape(count, per_row, -1) if per_row else None
    return split


# ---- step 2: the whole batch's loss on cached features ---------------------------------------------------------------
def _feature_gradients(local, ids, loss_from_features, gather, forward_context):
    """The global loss on the cached features, and d loss / d each local cached feature.

    The local features become leaves and are gathered WITH grad: the gather's backward (a sum over ranks) hands
    each rank world_size x its rows' gradient, as the whole-batch path does (module docstring). ``backward`` rather
    than ``autograd.grad``: should the loss hold parameters of its own (a learned temperature), their gradient
    accumulates too, as in the whole-batch path.
    """
    leaves = {kind: None if value is None else value.detach().requires_grad_() for kind, value in local.items()}
    with forward_context():
        features = {kind: None if leaf is None else gather(leaf) for kind, leaf in leaves.items()}
        features["ids"] = gather(ids)
        loss, parts = loss_from_features(features)
    loss.backward()
    gradients = {kind: _gradient_or_zeros(leaf) for kind, leaf in leaves.items() if leaf is not None}
    return loss.detach(), parts, _detached(features), gradients


def _gradient_or_zeros(leaf: torch.Tensor) -> torch.Tensor:
    # a feature the loss ignores gets no gradient; zeros keep every micro-batch's backward the same shape
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


# ---- step 3: re-encode each micro-batch with a graph and back-propagate the cached gradients -------------------------
def _backpropagate_micro_batches(rows, micro_batches, encoders, gradients, rng_states, forward_context) -> None:
    """Accumulate d loss / d theta, one micro-batch graph at a time.

    A tower whose output needs no gradient (frozen: ``train_towers="vision"``) is encoded once to find out, then
    skipped; restoring the RNG state per tower keeps the other tower's replay exact when one is skipped.
    """
    trains = {"image": True, "text": True}
    for micro_batch, states in zip(micro_batches, rng_states):
        outputs, output_gradients = [], []
        for tower in ("image", "text"):
            if not trains[tower]:
                continue
            _restore_rng_state(states[tower])
            with torch.enable_grad(), forward_context():
                if tower == "image":
                    output, share = encoders["image"](rows.images[micro_batch], micro_batch)
                else:
                    output, share = encoders["text"](rows.caption_tokens(micro_batch)), None
            trains[tower] = output.requires_grad
            if output.requires_grad:
                outputs.append(output)
                output_gradients.append(_tower_gradient(gradients, rows, tower, micro_batch).to(output.dtype))
            if share is not None and share.requires_grad:
                outputs.append(share)
                output_gradients.append(torch.ones_like(share))
        if outputs:
            torch.autograd.backward(outputs, grad_tensors=output_gradients)
    # leave the generator where the first pass left it (a skipped tower would otherwise shift it)
    _restore_rng_state(rng_states[-1]["end"])


def _tower_gradient(gradients: dict, rows: _Rows, tower: str, micro_batch: slice) -> torch.Tensor:
    """The cached gradient of one micro-batch's tower output, laid out like that output (``caption_tokens``)."""
    if tower == "image":
        return gradients["image"][micro_batch]
    parts = [gradients["text"][micro_batch]]
    parts += [gradients[kind][micro_batch].flatten(0, 1) for kind in ("hard", "extra") if kind in gradients]
    return torch.cat(parts)


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _checked_micro_batch_size(micro_batch_size: int) -> int:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1 (rows per micro-batch), got {micro_batch_size!r}")
    return micro_batch_size


def _checked_rows(images, texts, hard, extra, image_ids) -> _Rows:
    """Row-aligned inputs; hard or extra negatives with zero columns count as not encoded (None), as in the trainer."""
    n = texts.shape[0] if texts.ndim == 2 else -1
    if n < 1:
        raise ValueError(f"texts must be [n, ctx] tokens with n >= 1, got shape {tuple(texts.shape)}")
    if images.shape[0] != n or tuple(image_ids.shape) != (n,):
        raise ValueError(
            f"images {tuple(images.shape)} and image_ids {tuple(image_ids.shape)} must have the {n} rows of texts"
        )
    for name, group in (("hard_negatives", hard), ("extra_negatives", extra)):
        if group is not None and (group.ndim != 3 or group.shape[0] != n):
            raise ValueError(f"{name} must be [n={n}, count, ctx] tokens or None, got shape {tuple(group.shape)}")
    hard = hard if hard is not None and hard.shape[1] > 0 else None
    extra = extra if extra is not None and extra.shape[1] > 0 else None
    return _Rows(images, texts, hard, extra)


def _micro_batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _capture_rng_state() -> _RngState:
    # only the current CUDA device: the model lives there (torchrun sets it per rank), and asking every device would
    # touch devices this rank does not use
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _RngState(cpu=torch.get_rng_state(), cuda=cuda)


def _restore_rng_state(state: _RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda)


def _detached(values: dict) -> dict:
    return {key: value.detach() if isinstance(value, torch.Tensor) else value for key, value in values.items()}
