"""Contrastive losses for fine-tuning CLIP with Hard Negative Captions (docs/design.md, "The loss").

For a batch of N images with features v_i, positive captions u_i, K >= 1 HNC negatives h_ik of
image i and M >= 0 extra random negative captions r_im of image i, with s = cosine similarity:

    image->text_i = -log  e^{s(v_i,u_i)/tau} / ( e^{s(v_i,u_i)/tau} + alpha sum_k e^{s(v_i,h_ik)/tau}
                                                 + sum_{j != i} e^{s(v_i,u_j)/tau} + sum_m e^{s(v_i,r_im)/tau} )
    text->image_i = -log  e^{s(v_i,u_i)/tau} / sum_k e^{s(v_k,u_i)/tau}
    loss          = mean_i image->text_i + mean_i text->image_i          (a sum of the two directions)

Rows that show the same image (same image id) are never each other's negatives, in either direction.
Everything is computed as logits and ``logsumexp`` so that small temperatures cannot overflow, and in
float32 or wider even under autocast: bf16 similarities would blur differences of ~1e-2, which a
temperature of 0.01 turns into logit errors of order one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

ImageIds = Union[torch.Tensor, Sequence[Union[str, int]]]

__all__ = ["hnc_contrastive_loss", "plain_clip_loss", "caption_similarities", "hard_negative_accuracy"]


def hnc_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_negative_features: torch.Tensor,
    *,
    alpha: float,
    tau: float,
    extra_negative_features: torch.Tensor | None = None,
    image_ids: ImageIds | None = None,
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The seed's HNC loss: symmetric InfoNCE whose image->text side adds the image's own hard negatives.

    Args:
        image_features: [N, D] image embeddings (normalised here; need not be unit length).
        text_features: [N, D] embeddings of each image's positive caption.
        hard_negative_features: [N, K, D], K >= 1: row i holds the HNC negatives of image i only.
        alpha: weight of the HNC negatives (>= 0); 0 removes them exactly.
        tau: fixed softmax temperature (> 0, no clamp).
        extra_negative_features: [N, M, D] random negative captions of image i, or None.
        image_ids: [N] integer tensor or a sequence of str/int ids; rows with equal ids are not each
            other's negatives. An integer tensor avoids an O(N) Python pass over the ids.
        return_parts: also return the two directions.

    Returns:
        The scalar loss (float32, or float64 for float64 input); with ``return_parts`` a dict with
        keys ``loss``, ``image_to_text`` and ``text_to_image``.

    Raises:
        ValueError: alpha < 0 or tau <= 0 (or either not finite), or inconsistent shapes / ids.
        TypeError: non-floating features or non-integer id tensor.
    """
    log_alpha = _log_alpha(alpha)
    scale = 1.0 / _checked_tau(tau)
    n, dim = _check_image_and_text(image_features, text_features)
    _check_per_image_captions(hard_negative_features, "hard_negative_features", n, dim, min_count=1)
    if extra_negative_features is not None:
        _check_per_image_captions(extra_negative_features, "extra_negative_features", n, dim, min_count=0)
    features = [image_features, text_features, hard_negative_features]
    if extra_negative_features is not None:
        features.append(extra_negative_features)

    with _autocast_disabled(image_features.device.type):
        v, u, h, *rest = _unit_vectors(features)
        in_batch = _mask_same_image_pairs((v @ u.T) * scale, image_ids, n)
        # log(alpha) as a logit offset puts the weight inside the logsumexp; alpha = 0 gives -inf,
        # whose exp (and gradient) is exactly 0.
        hard = _own_caption_logits(v, h) * scale + log_alpha
        image_side = [hard] + [_own_caption_logits(v, r) * scale for r in rest]
        image_to_text, text_to_image = _symmetric_infonce(in_batch, image_side)
    return _assemble(image_to_text, text_to_image, return_parts)


def plain_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    tau: float,
    image_ids: ImageIds | None = None,
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Symmetric InfoNCE (CLIP's loss) at a fixed temperature, as a sum of the two directions.

    Equals ``hnc_contrastive_loss`` with alpha = 0 and no extra negatives; it is twice open_clip's
    ``ClipLoss`` (which averages the directions) at ``logit_scale = 1 / tau``. Rows with equal
    ``image_ids`` are not each other's negatives. ``return_parts`` as in ``hnc_contrastive_loss``.
    """
    scale = 1.0 / _checked_tau(tau)
    n, _ = _check_image_and_text(image_features, text_features)
    with _autocast_disabled(image_features.device.type):
        v, u = _unit_vectors([image_features, text_features])
        in_batch = _mask_same_image_pairs((v @ u.T) * scale, image_ids, n)
        image_to_text, text_to_image = _symmetric_infonce(in_batch, [])
    return _assemble(image_to_text, text_to_image, return_parts)


def caption_similarities(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_negative_features: torch.Tensor | None = None,
    extra_negative_features: torch.Tensor | None = None,
    *,
    image_ids: ImageIds | None = None,
) -> torch.Tensor:
    """Cosine similarity of each image to every caption its image->text loss ranks: [N, N + K + M].

    Columns: the batch's N positives (another row of the same image masked to -inf, as in the loss), then the
    image's own K hard and M extra negatives. The distribution that distillation matches (``hnclip.regularisers``).
    """
    n, dim = _check_image_and_text(image_features, text_features)
    features = [image_features, text_features]
    for name, group in (("hard_negative_features", hard_negative_features),
                        ("extra_negative_features", extra_negative_features)):
        if group is not None:
            _check_per_image_captions(group, name, n, dim, min_count=0)
            features.append(group)
    with _autocast_disabled(image_features.device.type):
        v, u, *own = _unit_vectors(features)
        in_batch = _mask_same_image_pairs(v @ u.T, image_ids, n)
        return torch.cat([in_batch, *(_own_caption_logits(v, group) for group in own)], dim=1)


@torch.no_grad()
def hard_negative_accuracy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    hard_negative_features: torch.Tensor,
) -> torch.Tensor:
    """Fraction of rows whose positive caption beats every one of its HNC negatives.

    A row counts when s(v_i, u_i) > max_k s(v_i, h_ik), strictly: a tie is a failure. Returns a
    0-dim float tensor (float32, or float64 for float64 input).
    """
    n, dim = _check_image_and_text(image_features, text_features)
    _check_per_image_captions(hard_negative_features, "hard_negative_features", n, dim, min_count=1)
    with _autocast_disabled(image_features.device.type):
        v, u, h = _unit_vectors([image_features, text_features, hard_negative_features])
        positive = (v * u).sum(dim=-1)
        hardest = _own_caption_logits(v, h).amax(dim=1)
        return (positive > hardest).to(v.dtype).mean()


def _symmetric_infonce(
    in_batch: torch.Tensor, image_side_logits: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions' mean InfoNCE from the [N, N] image-by-text logits plus per-image extra logits.

    The positive sits on the diagonal of ``in_batch``; ``image_side_logits`` ([N, *] each) join only
    the image->text denominators.
    """
    positives = in_batch.diagonal()
    image_logits = torch.cat([in_batch, *image_side_logits], dim=1) if image_side_logits else in_batch
    image_to_text = (torch.logsumexp(image_logits, dim=1) - positives).mean()
    text_to_image = (torch.logsumexp(in_batch, dim=0) - positives).mean()
    return image_to_text, text_to_image


def _own_caption_logits(v: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of image i with each of its own captions: [N, D] x [N, C, D] -> [N, C]."""
    return torch.einsum("nd,ncd->nc", v, captions)


def _mask_same_image_pairs(in_batch: torch.Tensor, image_ids: ImageIds | None, n: int) -> torch.Tensor:
    """Set logits of pairs (i, j), i != j, that show the same image to -inf (they are not negatives)."""
    if image_ids is None:
        return in_batch
    codes = _image_id_codes(image_ids, n, in_batch.device)
    same_image = codes[:, None] == codes[None, :]
    same_image.fill_diagonal_(False)  # a row's own positive always stays
    return in_batch.masked_fill(same_image, -math.inf)


def _image_id_codes(image_ids: ImageIds, n: int, device: torch.device) -> torch.Tensor:
    """Image ids as an [N] integer tensor on ``device`` (equal ids -> equal codes)."""
    if isinstance(image_ids, torch.Tensor):
        if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex:
            raise TypeError(f"image_ids must be an integer tensor, got dtype {image_ids.dtype}")
        if image_ids.shape != (n,):
            raise ValueError(f"image_ids must have shape ({n},) to match the batch, got {tuple(image_ids.shape)}")
        return image_ids.to(device)
    if isinstance(image_ids, (str, bytes)):
        raise TypeError("image_ids must be a tensor or a sequence of ids, got a single string")
    ids = list(image_ids)
    if len(ids) != n:
        raise ValueError(f"image_ids has {len(ids)} entries but the batch has {n} rows")
    code_of: dict[str | int, int] = {}
    codes = [code_of.setdefault(image_id, len(code_of)) for image_id in ids]
    return torch.tensor(codes, dtype=torch.long, device=device)


def _unit_vectors(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2-normalise each tensor along its last axis in a common dtype of at least float32."""
    dtype = torch.float32
    for tensor in features:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [F.normalize(tensor.to(dtype), dim=-1) for tensor in features]


def _autocast_disabled(device_type: str) -> torch.autocast:
    """A context that turns autocast off, so the matmuls run in the dtype we cast to."""
    return torch.autocast(device_type=device_type, enabled=False)


def _assemble(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, return_parts: bool
) -> torch.Tensor | dict[str, torch.Tensor]:
    loss = image_to_text + text_to_image
    if not return_parts:
        return loss
    return {"loss": loss, "image_to_text": image_to_text, "text_to_image": text_to_image}


def _log_alpha(alpha: float) -> float:
    """log(alpha), with alpha = 0 mapped to -inf; rejects negative or non-finite alpha."""
    value = float(alpha)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return math.log(value) if value > 0.0 else -math.inf


def _checked_tau(tau: float) -> float:
    value = float(tau)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return value


def _check_image_and_text(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[int, int]:
    """Validate the [N, D] image and positive-text features; return (N, D)."""
    _check_floating(image_features, "image_features")
    _check_floating(text_features, "text_features")
    if image_features.ndim != 2 or image_features.shape[0] < 1 or image_features.shape[1] < 1:
        raise ValueError(f"image_features must have shape [N, D] with N, D >= 1, got {tuple(image_features.shape)}")
    if text_features.shape != image_features.shape:
        raise ValueError(
            f"text_features must have the shape of image_features {tuple(image_features.shape)}, "
            f"got {tuple(text_features.shape)}"
        )
    return image_features.shape[0], image_features.shape[1]


def _check_per_image_captions(features: torch.Tensor, name: str, n: int, dim: int, *, min_count: int) -> None:
    """Validate [N, C, D] per-image caption features with C >= min_count."""
    _check_floating(features, name)
    if features.ndim != 3 or features.shape[0] != n or features.shape[2] != dim or features.shape[1] < min_count:
        raise ValueError(
            f"{name} must have shape [N={n}, C>={min_count}, D={dim}], got {tuple(features.shape)}"
        )


def _check_floating(features: torch.Tensor, name: str) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
