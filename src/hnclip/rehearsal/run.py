"""The scale rehearsal: the thesis path (real file formats, GQA-size JPEGs, the real tower's shapes) run on one machine
at a fraction of the real counts, with every stage's peak memory set beside the estimate and extrapolated to full size.

    python -m hnclip.rehearsal --fraction 0.01                  # ViT-L-14-336, random init (about an hour on 2 cores)
    python -m hnclip.rehearsal --fraction 0.01 --model hnclip-tiny-336   # 336 px images, a tiny tower (minutes)

It writes ``results/rehearsal-<fraction>-<model>/``: the world (``hnclip.rehearsal.world``), a LLaVA base with the
model's tower and a tiny language model (``hnclip.rehearsal.llava_base``), random-init CLIP weights standing in for
the downloaded ones, a zero-shot folder at the fraction of CIFAR-100's 10,000 test images, and a ``config.yaml``
pointing every ``paths:`` key at them (``data_source: download``: nothing is synthesised by the pipeline, nothing is
downloaded). Then Snakemake runs the thesis rules on it (one grid cell, a few steps) and the rules' ``benchmark:``
logs give each job's peak memory, its whole process tree (loader workers included; ``hnclip.memory``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hnclip.pipeline.config import REPO_ROOT
from hnclip.memory import BOUNDED_HEAP_ENVIRONMENT

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-L-14-336-quickgelu"
CIFAR100_TEST_IMAGES = 10_000
ZEROSHOT_CLASSES = 10
# benchmark folder -> (stage shown, the estimate's rule name or None when it has no estimate)
STAGES = {
    "preprocess_hnc": ("preprocess_hnc", None),
    "preprocess_vqa": ("preprocess_vqa", None),
    "import_baseline": ("import_baseline", None),
    "finetune": ("finetune", "finetune"),
    "evaluate_encoder": ("evaluate_encoder", "evaluate"),
    "export": ("export (tower delta)", "export"),
    "vqa": ("vqa", "vqa"),
}


@dataclass(frozen=True)
class RehearsalSettings:
    fraction: float
    model: str = DEFAULT_MODEL
    steps: int = 3
    batch_size: int = 8
    vqa_questions: int = 100
    cores: int = 2
    seed: int = 0
    zeroshot_images: int | None = None  # None = the fraction of CIFAR-100's 10,000 test images

    @property
    def run_name(self) -> str:
        return f"rehearsal-{self.fraction:g}-{self.model}"


# ---- inputs -------------------------------------------------------------------------------------------------------
def _write_zeroshot_folder(root: Path, n_images: int, seed: int) -> Path:
    """An ImageNet-style folder tree of ``n_images`` GQA-size JPEGs in ``ZEROSHOT_CLASSES`` classes."""
    import numpy as np

    from hnclip.rehearsal.world import photo_like_image, save_jpeg

    if (root / ".complete").is_file():
        return root
    names = ["cup", "plate", "dog", "car", "tree", "chair", "sign", "bus", "lamp", "clock"][:ZEROSHOT_CLASSES]
    for index in range(n_images):
        folder = root / names[index % ZEROSHOT_CLASSES]
        folder.mkdir(parents=True, exist_ok=True)
        save_jpeg(photo_like_image(np.random.default_rng([seed, 7, index]), 500, 375), folder / f"{index:06d}.jpg")
    (root / ".complete").write_text(f"{n_images}\n")
    return root


def _zeroshot_images(settings: RehearsalSettings) -> int:
    if settings.zeroshot_images is not None:
        return settings.zeroshot_images
    return max(2 * ZEROSHOT_CLASSES, round(settings.fraction * CIFAR100_TEST_IMAGES))


def prepare_inputs(settings: RehearsalSettings, run_dir: Path) -> dict[str, Any]:
    """World, LLaVA base, CLIP weights and zero-shot folder of the rehearsal; each is kept when already complete."""
    from hnclip.rehearsal.llava_base import write_rehearsal_llava_base
    from hnclip.rehearsal.world import write_scale_world

    world_dir = run_dir / "inputs" / "world"
    if (world_dir / "world.json").is_file():
        world = json.loads((world_dir / "world.json").read_text())
    else:
        world = write_scale_world(world_dir, fraction=settings.fraction, seed=settings.seed,
                                  max_vqa_questions=settings.vqa_questions)
    base, clip_weights = run_dir / "inputs" / "llava_base", run_dir / "inputs" / "clip.safetensors"
    if not (base / "config.json").is_file() or not clip_weights.is_file():
        # one random CLIP: its tower is the base's, the whole model stands in for the downloaded weights
        write_rehearsal_llava_base(base, clip_name=settings.model, seed=settings.seed, clip_weights_out=clip_weights)
    paths = {
        **world["paths"],
        "llava_base": str(base.resolve()),
        "clip_weights": str(clip_weights.resolve()),
        "zeroshot": str(_write_zeroshot_folder(run_dir / "inputs" / "zeroshot", _zeroshot_images(settings),
                                               settings.seed).resolve()),
    }
    return {"world": world, "paths": paths}


def rehearsal_config(settings: RehearsalSettings, paths: dict[str, str], train_images: int,
                     train_pairs: int) -> dict[str, Any]:
    """The thesis config (config.yaml) reduced to one grid cell and a few steps, on the rehearsal's inputs, on CPU."""
    threads = settings.cores
    cpu_job = {"threads": threads, "mem_mb": "auto", "gpu": 0}
    return {
        "run_name": settings.run_name,
        "data_source": "download",
        "paths": paths,
        "preprocess": {"hnc_shards": {"train": 4, "val": 1, "test": 1}, "vqa_subsample": None},
        "model": {"clip_name": settings.model, "clip_pretrained": None},
        "finetune": {
            "grid": {"alpha": [1.0], "tau": [0.05], "seed": [settings.seed]},
            "steps": settings.steps, "batch_size": settings.batch_size, "micro_batch_size": None,
            "warmup_steps": 1, "val_every": settings.steps, "val_pairs": 4 * settings.batch_size,
            "checkpoint_every": settings.steps,
            "image_cache_mb": 0,  # read from disk per batch at every size, as at the real size
        },
        # The rehearsal world writes no compositionality benchmarks: their item tables are small beside the stages
        # it measures (SugarCrepe 7,511 items, ARO ~ 75,000 captions, Winoground 400).
        "evaluate": {"batch_size": settings.batch_size, "n_boot": 100, "zeroshot_format": "folder",
                     "drift_images": 20, "compositional": []},
        "llava": {"chunks": 1, "batch_size": 4, "max_new_tokens": 4, "dtype": "float32"},
        "resources": {"default": {"threads": threads},
                      "finetune": {**cpu_job, "runtime": 600}, "evaluate": {**cpu_job, "runtime": 600},
                      "export": {**cpu_job, "runtime": 60}, "vqa": {**cpu_job, "runtime": 600}},
        "estimate": {"train_pairs": train_pairs, "train_images": train_images},
    }


# ---- running and reading the benchmarks ---------------------------------------------------------------------------
def run_pipeline(config_file: Path, settings: RehearsalSettings, workdir: Path, targets: list[str] | None = None) -> None:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(config_file), "--replace-workflow-config", "--cores",
               str(settings.cores), "--printshellcmds", *(targets or ["all"])]
    log.info("running %s", " ".join(command))
    # The models run on the CPU here: fixing glibc's threshold keeps their activations, which a GPU job holds on the
    # card, from passing for host memory that grows with the data (hnclip.memory.bound_heap_growth).
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **BOUNDED_HEAP_ENVIRONMENT}
    subprocess.run(command, cwd=workdir, check=True, env=environment)


def peak_memory_by_stage(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per rule: the largest peak Pss (MB) its jobs' logs record (hnclip.memory) and the longest job time (s)."""
    from hnclip.memory import peak_from_log

    peaks: dict[str, dict[str, float]] = {}
    for log_file in sorted((run_dir / "logs").rglob("*.log")):
        relative = log_file.relative_to(run_dir / "logs")
        peak = peak_from_log(log_file)
        if peak is None:
            continue
        stage = peaks.setdefault(relative.parts[0], {"pss_mb": 0.0, "anon_mb": 0.0, "seconds": 0.0, "jobs": 0})
        stage["pss_mb"] = max(stage["pss_mb"], peak.pss_mb)
        stage["anon_mb"] = max(stage["anon_mb"], peak.anon_pss_mb)
        stage["seconds"] = max(stage["seconds"], _job_seconds(run_dir / "benchmarks" / relative.with_suffix(".tsv")))
        stage["jobs"] += 1
    return peaks


def _job_seconds(benchmark: Path) -> float:
    if not benchmark.is_file():
        return 0.0
    with open(benchmark, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    try:
        return float(rows[-1]["s"])
    except (IndexError, KeyError, ValueError):
        return 0.0


def over_thesis_config(changes: dict[str, Any]) -> dict[str, Any]:
    """config.yaml with ``changes`` merged in: the run's whole config, written beside its results."""
    from hnclip.pipeline.config import load_yaml

    merged = load_yaml(REPO_ROOT / "config.yaml")
    _merge(merged, changes)
    return merged


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    from hnclip.pipeline.config import validate_config

    return validate_config(copy.deepcopy(config), base_dir=REPO_ROOT)


def _merge(base: dict, changes: dict) -> None:
    """Snakemake's own rule for --configfile over the default configfile: dicts merge, everything else replaces."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _estimated_mb(config: dict[str, Any], on_cpu: bool) -> dict[str, float]:
    """Per rule, the peak host memory hnclip.pipeline.estimate gives; on the CPU the model's device memory (weights,
    optimizer state, activations) is host memory too, so the GPU estimate is added, without the CUDA context."""
    from hnclip.pipeline.estimate import CUDA_OVERHEAD_MB, footprints

    return {f.rule: f.host_mb + (max(0.0, f.gpu_mb - CUDA_OVERHEAD_MB) if on_cpu else 0.0)
            for f in footprints(_validated(config))}


def report(run_dir: Path, config: dict[str, Any], world: dict[str, Any], on_cpu: bool = True) -> str:
    """Measured peaks beside the estimate at this size and at the full counts, and the extrapolation."""
    real_pairs = world["real_counts"]["hnc_train"]["pairs"]
    estimated_here = _estimated_mb(config, on_cpu)
    estimated_full = _estimated_mb({**config, "estimate": {**config.get("estimate", {}),
                                                           **_train_counts(world["real_counts"])}}, on_cpu)
    counts = world["counts"]
    lines = [
        f"scale rehearsal at fraction {world['fraction']:g} of the real counts: {counts['hnc_train']['images']:,} train "
        f"images, {counts['hnc_train']['pairs']:,} pairs; {counts['vqav2']['questions']} VQA v2 + "
        f"{counts['textvqa']['questions']} TextVQA questions; model {config['model']['clip_name']}"
        f"{' on the CPU' if on_cpu else ''}",
        "",
        f"{'stage':<22} {'jobs':>4} {'peak Pss MB':>12} {'anonymous':>10} {'est. MB':>8} {'est. full MB':>13} "
        f"{'extrapolated MB':>16} {'s':>7}",
    ]
    for folder, peak in peak_memory_by_stage(run_dir).items():
        name, rule = STAGES.get(folder, (folder, None))
        here_mb, full_mb = estimated_here.get(rule), estimated_full.get(rule)
        extrapolated = peak["pss_mb"] + (full_mb - here_mb) if rule else peak["pss_mb"]
        lines.append(f"{name:<22} {peak['jobs']:>4} {peak['pss_mb']:>12.0f} {peak['anon_mb']:>10.0f} "
                     f"{_or_dash(here_mb):>8} {_or_dash(full_mb):>13} {extrapolated:>16.0f} {peak['seconds']:>7.0f}")
    lines += ["", "peak Pss: the job's process tree (loader workers included), sampled every 0.2 s (hnclip.memory); "
                  "anonymous: its anonymous and shared-memory part. est.: hnclip.pipeline.estimate's peak host memory for this "
                  "config" + (", plus its GPU memory (the CPU holds the model, its optimizer state and activations "
                              "here)" if on_cpu else "") +
                  f"; est. full: the same settings with the real {real_pairs:,} training pairs; extrapolated: "
                  "measured + (est. full - est.). Image-reading stages stream, so their estimate does not grow with "
                  "the image count (tests/workflow/test_rehearsal_scale.py checks that at two sizes)."]
    return "\n".join(lines)


def _train_counts(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return {"train_images": counts["hnc_train"]["images"], "train_pairs": counts["hnc_train"]["pairs"]}


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def rehearse(settings: RehearsalSettings, targets: list[str] | None = None, workdir: Path = REPO_ROOT) -> str:
    """Prepare the inputs, run the pipeline on them in ``workdir`` and return the memory report (also written to
    ``results/<run_name>/rehearsal.txt``)."""
    run_dir = Path(workdir) / "results" / settings.run_name
    inputs = prepare_inputs(settings, run_dir)
    config = over_thesis_config(
        rehearsal_config(settings, inputs["paths"], **_train_counts(inputs["world"]["counts"])))
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    run_pipeline(config_file, settings, Path(workdir), targets)
    import torch

    text = report(run_dir, config, inputs["world"], on_cpu=not torch.cuda.is_available())
    (run_dir / "rehearsal.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, required=True, help="of the real counts (HNC train: 67,807 images)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="an open_clip model name (random init)")
    parser.add_argument("--steps", type=int, default=3, help="fine-tune steps of the one grid cell")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vqa-questions", type=int, default=100, help="per dataset")
    parser.add_argument("--zeroshot-images", type=int, default=None,
                        help="default: the fraction of CIFAR-100's 10,000 test images")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = RehearsalSettings(args.fraction, args.model, args.steps, args.batch_size, args.vqa_questions,
                                 args.cores, args.seed, args.zeroshot_images)
    print(rehearse(settings))
