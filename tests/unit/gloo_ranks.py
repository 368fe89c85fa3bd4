"""Two gloo processes on the CPU, as torchrun would start them: each computes a loss and gradients, and the test
gets both ranks' results back to compare with one process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

WORLD_SIZE = 2
RankResult = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (scalar loss, gradients by parameter name)


def _rank_main(rank: int, tmp: str, compute: Callable[..., RankResult], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        loss, gradients = compute(rank, *args)
        save_file({"loss": loss.detach().reshape(1), **{f"grad.{k}": v for k, v in gradients.items()}},
                  f"{tmp}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def run_two_ranks(compute: Callable[..., RankResult], tmp: Path, *args) -> list[RankResult]:
    """``compute(rank, *args)`` in two spawned ranks of one gloo group; their (loss, gradients), by rank.
    ``compute`` must be a module-level function (spawned processes import it)."""
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank_main, args=(rank, str(tmp), compute, args)) for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0, f"rank process exited with {process.exitcode}"
    results = []
    for rank in range(WORLD_SIZE):
        saved = load_file(Path(tmp) / f"rank{rank}.safetensors")
        results.append((saved["loss"][0], {k[len("grad."):]: v for k, v in saved.items() if k.startswith("grad.")}))
    return results
