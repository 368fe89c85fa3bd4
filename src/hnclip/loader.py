"""Work read ahead of its consumer by DataLoader worker processes, in order: training batches and VQA images.

Both the fine-tune and the VQA stage read many images; decoding them in the process that drives the GPU would leave
the card waiting. ``read_ahead`` hands each request to a worker and gives the results back in request order, and
``default_loader_workers`` sizes the pool from the job's threads, so every stage follows one rule.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterable, Iterator

import torch
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
    spare = min(threads - 1, MAX_LOADER_WORKERS)
    return max(spare, 1) if device.type == "cuda" else spare


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
