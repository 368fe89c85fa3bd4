"""Images per second per core of the two image paths on GQA-size JPEGs: fine-tuning's and LLaVA's.

Writes ``--images`` JPEGs as the scale-rehearsal world makes them (GQA sizes: mostly 500x375 / 500x333, quality
90, ~70 kB each), then times, for each loader worker count:

  train   ``hnclip.train.data.ImageFiles`` with the eval preprocess of ``--clip-name`` (the transform fine-tuning
          uses: bicubic resize of the short side to 336, centre crop, normalise) through ``image_batches``, the
          fine-tuner's ``read_in_order`` loader;
  llava   the VQA stage's path, as ``hnclip.llava.infer`` reads a batch: PIL decode, then
          ``hnclip.llava.prompt.preprocess_images`` (pad to a square in LLaVA's colour, ``CLIPImageProcessorPil`` at
          336), through the same ``read_ahead`` loader.

A "core" is what reads: the main process with 0 workers, else one per worker (the main process then only waits).
Workers are started and stopped inside the timing, as in a job. ``decode`` (0 workers) is ``load_image`` alone:
what the JPEG costs before any transform. Each process computes on one thread (``--threads``), as loader workers do.

    python bench/loader_throughput.py                         # 300 images, workers 0 1 2, batch 32
    python bench/loader_throughput.py --images 600 --workers 0 2 4 --batch-size 64 --keep /tmp/loader-bench
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch


def _preprocess_of(clip_name: str) -> Callable:
    """``create_clip(clip_name)``'s eval preprocess, the model built on the meta device (no 1.7 GB of weights)."""
    from hnclip.models import create_clip

    with torch.device("meta"):
        _, preprocess, _ = create_clip(clip_name, device="meta")
    return preprocess


class _LlavaPixels:
    """Loader side of the VQA path: a batch of image paths becomes LLaVA's ``pixel_values`` [n, 3, 336, 336]."""

    def __init__(self, image_size: int):
        from transformers import CLIPVisionConfig

        from hnclip.llava.demo_model import demo_image_processor
        from hnclip.llava.prompt import LLAVA_PAD_COLOUR

        self.processor = demo_image_processor(CLIPVisionConfig(image_size=image_size))
        self.colour = LLAVA_PAD_COLOUR

    def __call__(self, paths: tuple[str, ...]) -> torch.Tensor:
        from hnclip.loader import load_image
        from hnclip.llava.prompt import preprocess_images

        return preprocess_images([load_image(p) for p in paths], self.processor, self.colour)


def train_batches(paths: list[str], preprocess: Callable, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    from hnclip.loader import ImageFiles, image_batches

    return image_batches(ImageFiles(paths, preprocess), batch_size, num_workers=workers)


def llava_batches(paths: list[str], image_size: int, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    from hnclip.loader import read_ahead

    requests = [tuple(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    return read_ahead(_LlavaPixels(image_size), requests, num_workers=workers)


def decoded_only(paths: list[str], batch_size: int) -> Iterator[list]:
    from hnclip.loader import load_image

    for start in range(0, len(paths), batch_size):
        yield [load_image(p) for p in paths[start:start + batch_size]]


def timed(batches: Iterator) -> tuple[float, float, int, int, tuple]:
    """Exhaust ``batches`` (closing it, and so its workers, at the end): (seconds in all, seconds to the first
    batch, images in all, images in the first batch, shape of the last batch)."""
    started, first_s, first_n, count, shape = time.perf_counter(), 0.0, 0, 0, ()
    with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
        for batch in batches:
            if not count:
                first_s, first_n = time.perf_counter() - started, len(batch)
            count += len(batch)
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else (len(batch),)
    return time.perf_counter() - started, first_s, count, first_n, shape


def describe_jpegs(paths: list[str]) -> str:
    from PIL import Image

    sizes = [os.path.getsize(p) for p in paths]
    dims = Counter()
    for p in paths:
        with Image.open(p) as image:
            dims[f"{image.width}x{image.height}"] += 1
    common = ", ".join(f"{d} {n}" for d, n in dims.most_common(6))
    kb = [size / 1e3 for size in sizes]
    return (f"{len(paths)} JPEGs: mean {statistics.mean(kb):.1f} kB, median {statistics.median(kb):.1f} kB, "
            f"min {min(kb):.1f} kB, max {max(kb):.1f} kB; sizes: {common}")


HEADER = (f"{'path':<7} {'workers':>7} {'images':>6} {'seconds':>8} {'first s':>8} {'images/s':>9} "
          f"{'steady/s':>9} {'images/s/core':>14} {'steady/s/core':>14}   last batch")


def print_row(path: str, workers: int, result: tuple[float, float, int, int, tuple]) -> None:
    """One measurement; "steady" leaves out the wait for the first batch (worker start-up, the first read)."""
    seconds, first_s, images, first_n, shape = result
    cores = max(1, workers)
    rate = images / seconds
    steady = (images - first_n) / (seconds - first_s) if images > first_n and seconds > first_s else float("nan")
    print(f"{path:<7} {workers:>7} {images:>6} {seconds:>8.2f} {first_s:>8.2f} {rate:>9.1f} {steady:>9.1f} "
          f"{rate / cores:>14.1f} {steady / cores:>14.1f}   {shape}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clip-name", default="ViT-L-14-336-quickgelu")
    parser.add_argument("--paths", nargs="+", default=["train", "llava"], choices=["train", "llava"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the JPEGs here and keep them")
    args = parser.parse_args()

    import open_clip

    from hnclip.rehearsal.world import write_gqa_images

    torch.set_num_threads(args.threads)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        started = time.perf_counter()
        paths = write_gqa_images(workdir / "images", args.images, seed=args.seed)
        print(f"wrote {describe_jpegs(paths)} in {time.perf_counter() - started:.1f} s")
        preprocess = _preprocess_of(args.clip_name)
        image_size = int(open_clip.get_model_config(args.clip_name)["vision_cfg"]["image_size"])
        print(f"train preprocess: {preprocess}")
        print(f"cpus {os.cpu_count()}, torch threads {args.threads}, batch {args.batch_size}, "
              f"{args.clip_name} input {image_size} px\n")
        print(HEADER)
        print_row("decode", 0, timed(decoded_only(paths, args.batch_size)))
        for workers in args.workers:
            if "train" in args.paths:
                print_row("train", workers, timed(train_batches(paths, preprocess, args.batch_size, workers)))
            if "llava" in args.paths:
                print_row("llava", workers, timed(llava_batches(paths, image_size, args.batch_size, workers)))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
