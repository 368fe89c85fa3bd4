"""Training-step benchmarks, printed side by side in one run.

(a) step time of the HNC loss vs a plain CLIP loss that encodes the same number of texts (every hard negative
    becomes an ordinary extra column of the image->text softmax): the cost of our loss. Target ratio <= 1.05.
(b) samples/s of hnclip's training loop vs open_clip_train (shipped in the open_clip_torch wheel) on the same
    model, batch size and data, alpha = 0. Target >= 0.95.

    python bench/train_step.py                    # tiny demo model on the CPU
    python bench/train_step.py --device cuda --real-size   # random-init ViT-L-14-336 (on a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hnclip.losses import hnc_contrastive_loss
from hnclip.models import create_clip
from hnclip.train.data import BatchMaker, BatchPlan, PairData, load_image_tensors, read_shards, tokenize_all
from hnclip.train.trainer import Trainer, TrainSettings

REAL_MODEL = "ViT-L-14-336-quickgelu"
TINY_MODEL = "hnclip-tiny"


def synthetic_shards(workdir: Path, n_images: int) -> list[Path]:
    """A synthetic world written in HNC's format, preprocessed into pair shards, as the pipeline does."""
    from hnclip.data.hnc import write_pair_shards
    from hnclip.synth import WorldConfig, write_world

    world = workdir / "world"
    write_world(world, WorldConfig(n_train=n_images, n_val=50, n_test=50, n_vqa_train=10, n_vqa_val=10,
                                   n_textvqa_train=10, n_textvqa_val=10, zeroshot_per_class=1))
    out = workdir / "shards"
    write_pair_shards(world / "hnc/hnc_clean_strict_train.json", out, n_shards=1, images_dir=world / "gqa/images")
    return sorted(out.glob("part-*.parquet"))


def plain_clip_with_extra_columns(image, texts, n, tau):
    """Symmetric InfoNCE over N images and all encoded texts: the extra texts are plain image->text negatives."""
    image = torch.nn.functional.normalize(image, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    logits = image.float() @ texts.float().T / tau
    targets = torch.arange(n, device=image.device)
    return (torch.nn.functional.cross_entropy(logits, targets)
            + torch.nn.functional.cross_entropy(logits[:, :n].T, targets))


def time_loss_steps(model, batches, steps: int, tau: float, device: str) -> dict[str, float]:
    """Median seconds per forward+backward+AdamW step for each loss, the same texts encoded either way.

    The two losses alternate step by step (and which goes first alternates too), so drift of a shared, noisy machine
    falls on both alike.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    times: dict[str, list[float]] = {"hnc": [], "plain": []}
    for step in range(steps + 3):
        batch = batches.batch(step)
        n, k = batch.hard_negatives.shape[:2]
        for loss_kind in (("hnc", "plain") if step % 2 else ("plain", "hnc")):
            started = _sync_time(device)
            with autocast:
                texts = model.encode_text(torch.cat([batch.texts, batch.hard_negatives.flatten(0, 1)]).to(device))
                image = model.encode_image(batch.images.to(device))
                if loss_kind == "hnc":
                    loss = hnc_contrastive_loss(image, texts[:n], texts[n:].reshape(n, k, -1), alpha=5.0, tau=tau,
                                                image_ids=batch.image_ids.to(device))
                else:
                    loss = plain_clip_with_extra_columns(image, texts, n, tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 3:  # warm-up steps are not timed
                times[loss_kind].append(_sync_time(device) - started)
    return {kind: sorted(values)[len(values) // 2] for kind, values in times.items()}


def release_cached_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync_time(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def our_loop_samples_per_s(model_name, shards, batch_size, steps, device, workdir: Path) -> float:
    """Wall-clock samples/s of hnclip's Trainer (alpha = 0), set-up excluded, first steps excluded."""
    model, preprocess, tokenizer = create_clip(model_name, device=device)
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=1e-5, seed=0, tau=0.07, alpha=0.0,
                             val_every=10**9, checkpoint_every=10**9)
    trainer = Trainer(settings, model, tokenizer, preprocess, read_shards(shards), None, workdir / "ours", device)
    trainer.setup()
    warmup = 3
    for step in range(warmup):
        trainer.step(step)
    started = _sync_time(device)
    for step in range(warmup, steps):
        trainer.step(step)
    return batch_size * (steps - warmup) / (_sync_time(device) - started)


def profile_our_loop(model_name, shards, batch_size, device, workdir: Path, steps: int = 6) -> None:
    """Where one step of hnclip's loop spends its time: torch.profiler over a few steps after a warm-up."""
    model, preprocess, tokenizer = create_clip(model_name, device=device)
    settings = TrainSettings(steps=100, batch_size=batch_size, lr=1e-5, seed=0, tau=0.07, alpha=0.0,
                             val_every=10**9, checkpoint_every=10**9)
    trainer = Trainer(settings, model, tokenizer, preprocess, read_shards(shards), None, workdir / "ours", device)
    trainer.setup()
    for step in range(3):
        trainer.step(step)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    started = _sync_time(device)
    with torch.profiler.profile(activities=activities) as profiler:
        for step in range(3, 3 + steps):
            trainer.step(step)
    seconds = (_sync_time(device) - started) / steps
    print(f"{seconds * 1e3:.1f} ms per step ({batch_size / seconds:.1f} samples/s) while profiled")
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def open_clip_train_samples_per_s(model_name, shards, batch_size, steps, device, workdir: Path) -> float:
    """open_clip_train's own samples/s on the same images and captions (positives), same batch size: the median of
    its per-step figures over the second half of the run (it logs every step, so each step's time is whole)."""
    table = read_shards(shards).drop_duplicates(["image_id", "positive"])
    csv_path = workdir / "train.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(table[["image_path", "positive"]].itertuples(index=False))
    samples = steps * batch_size
    command = [
        sys.executable, "-c",
        "import sys, hnclip.models; from open_clip_train.main import main; main(sys.argv[1:])",
        "--model", model_name, "--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", "\t",
        "--batch-size", str(batch_size), "--train-num-samples", str(samples), "--epochs", "1", "--workers", "0",
        "--lr", "1e-5", "--warmup", "0", "--log-every-n-steps", "1", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--logs", str(workdir / "logs"), "--report-to", "",
        "--precision", "amp_bf16" if device == "cuda" else "fp32", "--device", device, "--seed", "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    rates = re.findall(r"([0-9.]+)/s, [0-9.]+/s/gpu", result.stdout + result.stderr)
    if not rates:
        raise RuntimeError(f"open_clip_train reported no throughput:\n{result.stderr[-3000:]}")
    steady = sorted(float(rate) for rate in rates[len(rates) // 2 :])
    return steady[len(steady) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--real-size", action="store_true", help="random-init ViT-L-14-336 (use a GPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile-loop", action="store_true",
                        help="only profile a few steps of hnclip's loop (torch.profiler) and print where time goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_name = REAL_MODEL if args.real_size else TINY_MODEL
    batch_size = args.batch_size or (128 if args.real_size else 64)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards = synthetic_shards(workdir, n_images=max(400, batch_size * 4))
        if args.profile_loop:
            profile_our_loop(model_name, shards, batch_size, args.device, workdir)
            return
        model, preprocess, tokenizer = create_clip(model_name, device=args.device)
        data = PairData.from_pairs(read_shards(shards))
        batches = BatchMaker(BatchPlan(data, batch_size, seed=0), load_image_tensors(data.image_paths, preprocess),
                             tokenize_all(tokenizer, data.captions))
        step_times = time_loss_steps(model, batches, args.steps, 0.05, args.device)
        hnc, plain = step_times["hnc"], step_times["plain"]
        del batches
        ours = our_loop_samples_per_s(model_name, shards, batch_size, args.steps, args.device, workdir)
        release_cached_gpu_memory()  # open_clip_train runs in a child process and needs the card to itself
        theirs = open_clip_train_samples_per_s(model_name, shards, batch_size, args.steps, args.device, workdir)

    print(f"model {model_name}, batch {batch_size}, device {args.device}, threads {args.threads}")
    print(f"(a) step time  HNC loss {hnc * 1e3:8.1f} ms | plain CLIP, same texts {plain * 1e3:8.1f} ms | "
          f"ratio {hnc / plain:.3f} (target <= 1.05)")
    print(f"(b) samples/s  hnclip loop {ours:8.1f} | open_clip_train {theirs:8.1f} | "
          f"ratio {ours / theirs:.3f} (target >= 0.95)")
    if args.device == "cuda":
        print_mfu(model, ours, batch_size)


def print_mfu(model, samples_per_s: float, batch_size: int, peak_tflops: float = 989.0) -> None:
    """Model FLOPs utilisation of the loop of (b): 6 x parameters x tokens per sample (forward + backward) against
    the bf16 dense peak. At alpha = 0 the loop encodes one text per image (hard negatives carry no weight)."""
    visual = model.visual
    image_tokens = (visual.image_size[0] // visual.patch_size[0]) ** 2 + 1
    vision_params = sum(p.numel() for p in visual.parameters())
    text_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    flops_per_sample = 6 * (vision_params * image_tokens + text_params * model.context_length)
    mfu = samples_per_s * flops_per_sample / (peak_tflops * 1e12)
    print(f"MFU {mfu * 100:.1f} % of {peak_tflops:.0f} TFLOP/s (6 x params x tokens; 1 image + 1 text per sample)")


if __name__ == "__main__":
    main()
