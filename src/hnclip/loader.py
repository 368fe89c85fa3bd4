"""Work read ahead of its consumer by DataLoader worker processes, in order: training, evaluation and VQA images.

Both the fine-tune and the VQA stage read many images; decoding them in the process that drives the GPU would leave
the card waiting. ``read_ahead`` hands each request to a worker and gives the results back in request order, and
``default_loader_workers`` sizes the pool from the job's threads, so every stage follows one rule.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hnclip.memory import bound_heap_growth

MAX_LOADER_WORKERS = 8


def default_loader_workers(device: torch.device) -> int:
    """Reading processes for a job: its threads but the one that drives the model.

    A one-thread job on the CPU (the demo) gets none: work is read in the job's own process, as a worker would
    only add a process to share the same core. On a GPU there is at least one, so the card never waits for decoding.
    torchrun gives each rank one thread unless told otherwise; there a rank's share of the node's CPUs counts instead.
    """
    threads = torch.get_num_threads()
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ranks_on_node > 1 and threads == 1:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cpus // ranks_on_node)
    return loader_workers_for(threads, on_gpu=device.type == "cuda")


def loader_workers_for(threads: int, *, on_gpu: bool) -> int:
    """The rule itself, for a job of ``threads`` threads (also what ``hnclip.pipeline.estimate`` sizes memory by)."""
    spare = min(threads - 1, MAX_LOADER_WORKERS)
    return max(spare, 1) if on_gpu else spare


class Requests:
    """What the loader reads, in order, made lazily in this process (a plan may be too long to list)."""

    def __init__(self, make: Callable[[], Iterator[Any]], length: int):
        self.make, self.length = make, length

    def __iter__(self) -> Iterator[Any]:
        return self.make()

    def __len__(self) -> int:
        return self.length


class _Apply(Dataset):
    """Worker side: a request goes in, ``read(request)`` comes back."""

    def __init__(self, read: Callable[[Any], Any]):
        self.read = read

    def __getitem__(self, request: Any) -> Any:
        return self.read(request)


def _as_read(sample):
    # ``read`` already returns whole batches: nothing to collate
    return sample


def _init_worker(_worker_id: int) -> None:
    # SLURM signals every process of the job; a worker killed by SIGTERM would make the job fail in the middle of a
    # step instead of saving its state. Workers stop when the job closes the loader or exits.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    bound_heap_growth()  # a worker decodes every image of the stage: its heap must not grow with their number


def read_ahead(
    read: Callable[[Any], Any], requests: Iterable[Any], *, num_workers: int = 0, pin_memory: bool = False,
) -> Iterator[Any]:
    """``read(request)`` for each request, in order, computed by ``num_workers`` processes ahead of the consumer
    (0 = in this process when asked), tensors pinned for an asynchronous copy to the GPU if asked. ``read`` and the
    requests must pickle (they travel to the workers); the workers keep at most two results each in flight.

    The workers are shut down however the reading ends: exhausted, closed, or stopped by an error (an unreadable
    image). They ignore SIGTERM, so one left waiting for work would keep the process from ever exiting:
    multiprocessing's exit handler stops daemonic children with SIGTERM, then joins them.
    """
    results = iter(DataLoader(
        _Apply(read),
        batch_size=None,
        sampler=requests,
        num_workers=num_workers,
        collate_fn=_as_read,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if num_workers else None,
    ))
    try:
        yield from results
    finally:
        shutdown = getattr(results, "_shutdown_workers", None)  # the multi-process iterator's own clean-up
        if shutdown is not None:
            shutdown()


# ---- images ---------------------------------------------------------------------------------------------------------
class CroppedImage(NamedTuple):
    """A box of an image file, read as lazily as a path: (x, y, w, h) in pixels (ARO's VG crops)."""

    path: str
    box: tuple[float, float, float, float]


# An image to encode: a file path, a box of one, a PIL image, or an H×W×3 uint8 array (CIFAR keeps images in memory).
ImageSource = Union[str, os.PathLike, CroppedImage, Image.Image, np.ndarray]


class ImageReadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


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
    if isinstance(source, CroppedImage):
        x, y, w, h = source.box
        return load_image(source.path).crop((round(x), round(y), round(x + w), round(y + h)))
    path = Path(source)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


class ImageFiles:
    """Images on disk (or in memory), read, decoded and transformed only when a batch asks for them. The readers
    below take anything with ``len`` and ``take(indices)``: training's ``CachedImages`` too."""

    def __init__(self, paths: Sequence[ImageSource], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> torch.Tensor:
        """One image as the model takes it: [3, H, W] float32 (an unreadable file raises ImageReadError naming it)."""
        return self.transform(load_image(self.paths[index]))

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.read(int(i)) for i in indices])

    def decoded_bytes(self) -> int:
        """Memory all images would take decoded (they share one transform, hence one size: the first's)."""
        return len(self) * self.read(0).nbytes if len(self) else 0


# ---- image files read by DataLoader workers ------------------------------------------------------------------------------
class _ImagesOfRequest:
    """Worker side: a request (payload, indices) gives back (payload, images [n, 3, H, W])."""

    def __init__(self, images: ImageFiles):
        self.images = images

    def __call__(self, request: tuple[Any, np.ndarray]) -> tuple[Any, torch.Tensor]:
        payload, indices = request
        return payload, self.images.take(indices)


def read_in_order(
    images: ImageFiles, requests: Iterable[tuple[Any, np.ndarray]], *, num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """(payload, images) for each request in order, read by ``num_workers`` processes ahead of the consumer (0 = read
    in this process when asked); see ``hnclip.loader.read_ahead``."""
    return read_ahead(_ImagesOfRequest(images), requests, num_workers=num_workers, pin_memory=pin_memory)


def image_batches(
    images: ImageFiles, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """All images in order, ``batch_size`` at a time: [b, 3, H, W] float32. A consumer that may stop early closes
    it (``contextlib.closing``), which stops the loader's workers at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(images), batch_size)
    requests = Requests(lambda: ((None, np.arange(i, min(i + batch_size, len(images)))) for i in starts),
                         length=len(starts))
    for _, batch in read_in_order(images, requests, num_workers=num_workers, pin_memory=pin_memory):
        yield batch
