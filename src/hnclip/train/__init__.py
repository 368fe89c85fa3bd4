"""Training entry points used by the pipeline's rules: the demo baseline and one grid cell."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from hnclip.models import create_clip, default_device, load_clip, save_clip
from hnclip.io import write_json
from hnclip.provenance import provenance
from hnclip.resume import claim_state_dir, job_fingerprint, release_state_dir
from hnclip.train import distributed
from hnclip.train.data import read_shards
from hnclip.train.trainer import Preempted, Trainer, TrainSettings

__all__ = ["Preempted", "TrainSettings", "run_training", "train_job"]

log = logging.getLogger(__name__)


def run_training(
    settings: TrainSettings,
    *,
    model_name: str,
    init_weights: str | Path | None,
    train_shards: Sequence[str | Path],
    val_shards: Sequence[str | Path],
    state_dir: str | Path,
    out_weights: str | Path,
    out_log: str | Path,
    out_provenance: str | Path,
    config: dict | None = None,
    device: str | None = None,
    input_digests: dict[str, str] | None = None,
    loader: dict[str, int] | None = None,
) -> None:
    """Train from ``init_weights`` (None = random init), resuming from ``state_dir`` when it holds a state.

    The final weights, the per-step CSV log and provenance are written only at the end; until then the resume state
    stays in ``state_dir``, outside the rule's declared outputs, so Snakemake never deletes it when it cleans a
    failed job. Once the outputs are written the state is removed. Whether the state may be resumed at all is
    decided before (``train_job``), once for all ranks; ``input_digests`` are the sha256 of the inputs it
    computed then, for the provenance (without them the inputs are read again to digest them). ``loader`` passes
    ``num_workers`` / ``image_cache_bytes`` to the ``Trainer`` (how images are read, never what a batch holds).
    """
    device = device or default_device()
    rank, _ = distributed.init_from_env()
    torch.manual_seed(settings.seed)  # a random init (the demo baseline) is part of the run's seed too
    if init_weights is None:
        model, preprocess, tokenizer = create_clip(model_name)
    else:
        model, preprocess, tokenizer = load_clip(model_name, init_weights)
    model.train()
    trainer = Trainer(
        settings, model, tokenizer, preprocess,
        train_pairs=read_shards(train_shards),
        val_pairs=read_shards(val_shards) if val_shards else None,
        state_dir=state_dir, device=device, **(loader or {}),
    )
    trainer.train()
    if rank != 0:
        return
    save_clip(model, out_weights, metadata={"model_name": model_name, "steps": str(settings.steps)})
    shutil.copyfile(trainer.log_path, out_log)
    write_json(
        out_provenance,
        provenance(
            config, seed=settings.seed, inputs=[*train_shards, *val_shards, *([init_weights] if init_weights else [])],
            checksum_inputs=True, input_digests=input_digests, settings=settings.__dict__, model_name=model_name,
            trained_parameters=sum(p.numel() for p in trainer.parameters),
        ),
    )
    log.info("wrote %s", out_weights)
    release_state_dir(state_dir)


def training_fingerprint(spec: dict[str, Any]) -> dict[str, Any]:
    """What determines a training job's weights: its settings, model, initial weights, shards and code."""
    inputs = [*([spec["init_weights"]] if spec.get("init_weights") else []), *spec["train_shards"],
              *spec["val_shards"]]
    return job_fingerprint({"train": spec["settings"], "model_name": spec["model_name"]}, inputs)


def train_job(spec: dict[str, Any], gpus: int = 1) -> None:
    """One rule's training job: keep the resume state only if this very job made it, then train (in this process,
    or under torchrun with one process per GPU). ``spec`` holds ``run_training``'s keyword arguments, with
    ``settings`` as a dict."""
    fingerprint = training_fingerprint(spec)
    resuming = claim_state_dir(spec["state_dir"], fingerprint)
    log.info("%s %s", "continuing the state in" if resuming else "starting fresh in", spec["state_dir"])
    spec = {**spec, "input_digests": fingerprint["inputs"]}  # digested once: the provenance reuses them
    if gpus > 1:
        spec_path = Path(spec["state_dir"]) / "spec.json"
        spec_path.write_text(json.dumps(spec, default=str))
        launch_torchrun(spec_path, gpus)
    else:
        run_training(TrainSettings(**spec.pop("settings")), **spec)


def launch_torchrun(spec_path: str | Path, n_processes: int) -> None:
    """Run ``python -m hnclip.train spec_path`` under torchrun with one process per GPU of this node."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
               "-m", "hnclip.train", str(spec_path)]
    log.info("launching %s", " ".join(command))
    subprocess.run(command, check=True)
