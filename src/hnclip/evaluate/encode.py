"""Batched, gradient-free encoding of images and captions with an open_clip CLIP model.

Every evaluation reads features through these helpers so that eval mode, ``no_grad``, normalisation and
batching are done one way. Features come back L2-normalised, float32, on the CPU: a cosine similarity is
then a dot product.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hnclip.loader import read_ahead

# An image to encode: a file path, a PIL image, or an H×W×3 uint8 array (CIFAR keeps images in memory).
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]
Preprocess = Callable[[Image.Image], torch.Tensor]


class ImageReadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


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


def load_image(source: ImageSource) -> Image.Image:
    """Return ``source`` as an RGB PIL image; a path is opened and fully decoded here."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(
                f"in-memory image must be an H×W×3 uint8 array, not shape {source.shape} {source.dtype}"
            )
        return Image.fromarray(source)  # H×W×3 uint8 is RGB
    path = Path(source)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


class _PreprocessedBatch:
    """Loader side: a range of ``sources`` gives back their preprocessed images as one [B, 3, H, W] batch."""

    def __init__(self, sources: Sequence[ImageSource], preprocess: Preprocess) -> None:
        self.sources = sources
        self.preprocess = preprocess

    def __call__(self, span: tuple[int, int]) -> torch.Tensor:
        start, stop = span
        return torch.stack([self.preprocess(load_image(self.sources[i])) for i in range(start, stop)])


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
    processes (``hnclip.loader.read_ahead``, as training and VQA read theirs)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = [(start, min(start + batch_size, len(sources))) for start in range(0, len(sources), batch_size)]
    batches = read_ahead(_PreprocessedBatch(sources, preprocess), spans, num_workers=num_workers)
    with contextlib.closing(batches):
        yield from tqdm(batches, total=len(spans), desc=description, disable=not progress, unit="batch")


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
