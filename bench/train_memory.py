"""Peak host memory of fine-tuning against the number of training images: streamed images keep it flat.

For each size N it writes N synthetic 336 px JPEGs with K caption pairs each into one Parquet shard (the columns
training reads), runs a few training steps of the tiny model at 336 px input in a child process, and samples the
anonymous memory of the child's whole process tree (loader workers included) every 50 ms:

  RssAnon   summed over the processes, as /proc/<pid>/status gives it: pages a forked worker still shares with the
            trainer count once per process;
  Pss_Anon  summed over the processes (/proc/<pid>/smaps_rollup), anonymous and shared-memory pages (the loader's
            batches travel through /dev/shm): shared pages split between their sharers, so the sum is the host memory
            the tree really holds. The sampler is hnclip.memory's, the one every rule's log reports from.

Two sizes side by side give the growth per image. ``streamed`` reads the images from disk per batch (the trainer's
choice when the decoded set exceeds its image cache); ``cached`` decodes all of them into one tensor before the first
step, as every run did before (which also kept an int64 [captions, context] token table, not reproduced here: it
would add 61 kB per image at 120 pairs and the tiny model's context of 32).

The child runs with glibc's malloc thresholds fixed (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ = 128 kB): by
default glibc raises its mmap threshold after the first large free, so later steps' activations stay on the heap
after they are freed and the peak wandered by ~100 MB between identical runs; fixed, it repeats within 1 MB.
``--glibc-default-malloc`` measures without this.

    python bench/train_memory.py                              # 400 and 1,600 images, streamed and cached
    python bench/train_memory.py --sizes 400 1600 --pairs-per-image 120 --workers 2 --modes streamed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hnclip.memory import tree_memory

MODEL = "hnclip-tiny"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "gray"]
SHAPES = ["circle", "square", "triangle", "cross", "diamond", "star", "ring", "heart"]
RELATIONS = ["left of", "right of", "above", "below", "next to", "behind", "in front of", "on top of"]
TARGET_GROWTH_MB = 100.0


# ---- synthetic data ------------------------------------------------------------------------------------------------
def write_synthetic_shard(root: Path, n_images: int, pairs_per_image: int, size: int = 336, seed: int = 0) -> Path:
    """``n_images`` JPEGs of noise and shapes, each with ``pairs_per_image`` (true, swapped) caption pairs."""
    import pandas as pd
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        noise = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.integers(0, size - 60, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((int(x), int(y), int(x) + 60, int(y) + 60), fill=colour)
        path = images_dir / f"{i:06d}.jpg"
        image.save(path, quality=90)
        for k in range(pairs_per_image):
            positive, negative = _caption_pair(rng, i, k)
            rows.append(dict(image_id=f"img{i}", image_path=str(path), positive=positive, negative=negative,
                             type="relation_obj", type_group="relation", positive_id=f"{i}-{k}-p",
                             negative_id=f"{i}-{k}-n"))
    shard = root / "part-00000.parquet"
    pd.DataFrame(rows).to_parquet(shard)
    return shard


def _caption_pair(rng: np.random.Generator, image: int, pair: int) -> tuple[str, str]:
    """HNC-like captions (~15 tokens), distinct per pair like the real ones: a scene number keeps them apart."""
    (a, b), (s, t) = rng.choice(COLOURS, 2, replace=False), rng.choice(SHAPES, 2)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    scene = f"scene {image} view {pair}"
    return f"in {scene} a {a} {s} is {relation} a {b} {t}", f"in {scene} a {b} {t} is {relation} a {a} {s}"


# ---- the child: a few training steps ------------------------------------------------------------------------------
def run_child(args: argparse.Namespace) -> None:
    import open_clip
    import torch

    import hnclip.models  # noqa: F401  (registers the tiny architecture)
    from hnclip.train.data import read_shards
    from hnclip.train.trainer import Trainer, TrainSettings

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, force_image_size=args.image_size)
    tokenizer = open_clip.get_tokenizer(MODEL)
    pairs = read_shards([args.shard])
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=1e-4, seed=0, tau=0.07, alpha=1.0,
                             val_pairs=args.val_pairs, val_every=10**9, checkpoint_every=10**9)
    streamed = args.mode == "streamed"
    trainer = Trainer(settings, model, tokenizer, preprocess, pairs, pairs, args.state_dir,
                      num_workers=args.workers if streamed else 0, image_cache_bytes=0 if streamed else sys.maxsize)
    del pairs  # the trainer holds the tables only as long as it needs them, like in run_training
    started = time.perf_counter()
    trainer.setup()
    set_up = time.perf_counter()
    for step in range(args.steps):
        trainer.step(step)
    trainer.close_stream()
    accuracy = trainer.validate()
    print(json.dumps(dict(setup_s=set_up - started, steps_s=time.perf_counter() - set_up, val_accuracy=accuracy,
                          caption_bank_mb=trainer.batches.captions.nbytes / 1e6)), flush=True)


# ---- the parent: sample the child's process tree ------------------------------------------------------------------
def anonymous_memory_mb(root: int) -> tuple[float, float, int]:
    """(sum of RssAnon, sum of anonymous and shared-memory Pss) in MB over ``root``'s process tree, and how many
    processes it has (hnclip.memory, the sampler every rule's log reports from)."""
    memory = tree_memory(root)
    return memory.rss_anon_mb, memory.anon_pss_mb, memory.processes


def measure(shard: Path, mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run the child on ``shard`` and return its peak memory (sampled every 50 ms) and its own timings."""
    command = [sys.executable, __file__, "--child", "--shard", str(shard), "--mode", mode,
               "--workers", str(args.workers), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--val-pairs", str(args.val_pairs),
               "--state-dir", str(workdir / f"state-{mode}-{shard.parent.name}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not args.glibc_default_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0.0
    most_processes = 0
    while child.poll() is None:
        rss, pss, processes = anonymous_memory_mb(child.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        most_processes = max(most_processes, processes)
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the {mode} child on {shard} failed:\n{err[-4000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), peak_rss_anon_mb=peak_rss, peak_pss_anon_mb=peak_pss,
                processes=most_processes)


def report(results: dict[tuple[str, int], dict], sizes: list[int], modes: list[str], args) -> None:
    small, large = sizes[0], sizes[-1]
    print(f"\n{MODEL} at {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"{args.pairs_per_image} caption pairs per image, {args.workers} loader workers (streamed), "
          f"{'adaptive' if args.glibc_default_malloc else 'fixed'} malloc thresholds")
    header = (f"{'mode':<9}{'images':>8}{'pairs':>9}{'procs':>6}{'RssAnon MB':>12}{'Pss_Anon MB':>13}"
              f"{'captions MB':>13}{'setup s':>9}{'steps s':>9}")
    print(header)
    for mode in modes:
        for n in sizes:
            r = results[mode, n]
            print(f"{mode:<9}{n:>8}{n * args.pairs_per_image:>9}{r['processes']:>6}{r['peak_rss_anon_mb']:>12.1f}"
                  f"{r['peak_pss_anon_mb']:>13.1f}{r['caption_bank_mb']:>13.1f}{r['setup_s']:>9.1f}"
                  f"{r['steps_s']:>9.1f}")
    print(f"\ngrowth from {small} to {large} images (target < {TARGET_GROWTH_MB:.0f} MB):")
    for mode in modes:
        a, b = results[mode, small], results[mode, large]
        for key, name in (("peak_rss_anon_mb", "RssAnon"), ("peak_pss_anon_mb", "Pss_Anon")):
            growth = b[key] - a[key]
            verdict = "meets" if growth < TARGET_GROWTH_MB else "misses"
            print(f"  {mode:<9}{name:<9} {growth:8.1f} MB = {growth / (large - small) * 1e3:7.1f} kB per image"
                  f"  ({verdict} the target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 1600])
    parser.add_argument("--pairs-per-image", type=int, default=120, help="HNC train: 8.2 M pairs / 67,807 images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["streamed", "cached"], choices=["streamed", "cached"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--val-pairs", type=int, default=200)
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="leave glibc's adaptive malloc thresholds on in the child (noisier peaks)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for n in args.sizes:
            started = time.perf_counter()
            shard = write_synthetic_shard(workdir / f"n{n}", n, args.pairs_per_image, size=args.image_size)
            print(f"wrote {n} images, {n * args.pairs_per_image} pairs in {time.perf_counter() - started:.0f} s",
                  flush=True)
            for mode in args.modes:
                results[mode, n] = measure(shard, mode, args, workdir)
                r = results[mode, n]
                print(f"  {mode}: peak RssAnon {r['peak_rss_anon_mb']:.1f} MB, Pss_Anon {r['peak_pss_anon_mb']:.1f} MB",
                      flush=True)
    report(results, args.sizes, args.modes, args)


if __name__ == "__main__":
    main()
