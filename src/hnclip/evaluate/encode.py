"""Batched, gradient-free encoding of images and captions with an open_clip CLIP model.

Every evaluation reads features through these helpers so that eval mode, ``no_grad``, normalisation and
batching are done one way. Features come back L2-normalised, float32, on the CPU: a cosine similarity is
then a dot product.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from hnclip.loader import ImageFiles, ImageSource, image_batches

Preprocess = Callable[[Image.Image], torch.Tensor]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode under ``no_grad``, restoring its training flag afterwards.

    Restoring matters because the caller may be a training loop that evaluates mid-run.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def preprocessed_batches(
    sources: Sequence[ImageSource],
    preprocess: Preprocess,
    *,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "images",
) -> Iterator[torch.Tensor]:
    """Yield preprocessed image batches (B×3×H×W) in the order of ``sources``, read ahead by ``num_workers``
    processes: the reader training and VQA use (``hnclip.loader.image_batches``)."""
    batches = image_batches(ImageFiles(sources, preprocess), batch_size, num_workers=num_workers)
    total = -(-len(sources) // batch_size)
    with contextlib.closing(batches):
        yield from tqdm(batches, total=total, desc=description, disable=not progress, unit="batch")


def encode_images(
    model: torch.nn.Module,
    sources: Sequence[ImageSource],
    preprocess: Preprocess,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Encode each image once; return N×D L2-normalised float32 features on the CPU.

    ``device`` defaults to the model's device; the model is not moved.
    """
    device = torch.device(device) if device is not None else model_device(model)
    chunks: list[torch.Tensor] = []
    with evaluation_mode(model):
        for batch in preprocessed_batches(
            sources, preprocess, batch_size=batch_size, num_workers=num_workers, progress=progress,
            description="encode images",
        ):
            features = model.encode_image(batch.to(device), normalize=True)
            chunks.append(features.float().cpu())
    return _concatenate_features(chunks)


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Encode each caption; return N×D L2-normalised float32 features on the CPU, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    texts = list(texts)
    chunks: list[torch.Tensor] = []
    starts = range(0, len(texts), batch_size)
    with evaluation_mode(model):
        for start in tqdm(starts, desc="encode captions", disable=not progress, unit="batch"):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    return _concatenate_features(chunks)


def _concatenate_features(chunks: list[torch.Tensor]) -> torch.Tensor:
    if not chunks:
        raise ValueError("nothing to encode: the input sequence is empty")
    return torch.cat(chunks)
