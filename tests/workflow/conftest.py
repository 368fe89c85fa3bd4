"""Helpers for workflow tests: run Snakemake from the venv on this repository's Snakefile in a tmp directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(*args, cwd=REPO, timeout=900, check=True, warm=False) -> subprocess.CompletedProcess:
    """Snakemake on this repository's Snakefile; ``warm``: under hnclip.pipeline.warm, as ``make demo`` runs it."""
    wrapper = [sys.executable, "-m", "hnclip.pipeline.warm", "run", "--"] if warm else []
    result = subprocess.run(
        [*wrapper, *SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}."""
    section = output.split("Job stats:", 1)[1]
    counts = {}
    for line in section.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


def micro_config() -> dict:
    """The demo configuration shrunk so the whole DAG runs in a few minutes (same rules, same code)."""
    config = yaml.safe_load((REPO / "config.demo.yaml").read_text())
    config["synth"].update(n_train=240, n_val=60, n_test=60, n_vqa_train=120, n_vqa_val=40,
                           n_textvqa_train=60, n_textvqa_val=30, zeroshot_per_class=2)
    config["pretrain"].update(steps=30, batch_size=16)
    config["finetune"].update(grid={"alpha": [0.0, 2.0], "tau": [0.05], "seed": [0]}, steps=12, batch_size=16,
                              warmup_steps=2, val_every=6, val_pairs=40, checkpoint_every=4)
    config["evaluate"].update(n_boot=200, drift_images=20)
    config["llava"].update(align_steps=5, align_batch_size=8, pretrain_steps=10, max_new_tokens=4)
    return config


@pytest.fixture
def write_config(tmp_path):
    def write(config: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture(scope="module")
def slurm_available() -> None:
    """Skip (with the reason) where a local SLURM cluster cannot be installed: not root, or no apt."""
    from tests.slurm_cluster import ensure_slurm_installed

    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
