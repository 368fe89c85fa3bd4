"""Several GPUs on one node for one cell (torchrun): features are gathered WITH gradient, so every rank's
negatives span the global batch and the summed gradient equals the single-process gradient."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as collectives


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain run stays single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_and_world()


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; gradients flow back to each rank's own rows."""
    if not is_distributed():
        return features
    return collectives.all_gather_single_autograd(features.contiguous(), 0, dist.group.WORLD)


def global_count(count: int, device: torch.device) -> int:
    """The sum of ``count`` over ranks (``count`` itself in one process)."""
    if not is_distributed():
        return count
    total = torch.tensor([count], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def average_gradients(parameters) -> None:
    """Average gradients over ranks.

    Each rank's loss is the same global loss, and all_gather's backward sums every rank's contribution to a rank's
    own features, so each rank holds world_size times its share: the average of those is the global gradient.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world)
