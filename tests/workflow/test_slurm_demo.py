"""The demo workflow's grid cells on a real local SLURM cluster (tests/slurm_cluster.py).

tests/workflow/test_slurm.py proves the profile on a tiny smoke workflow; this module runs the real
`finetune` rule of this repository's Snakefile through `snakemake --executor slurm` with the test copy
of profiles/slurm, then preempts a training job with `scontrol requeue` and checks that the resumed run
ends with exactly the weights of an uninterrupted one.

Cost: one local CPU prep of the cells' inputs (synthetic world, HNC shards, baseline) shared by both
tests, two 12-step cells at once on a node with 2 fake GPUs, and one longer cell that is requeued once
while an uninterrupted twin trains locally beside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.slurm_cluster import (
    LOCAL_EDIT_VALUES,
    LOCAL_PARTITION,
    LocalSlurmCluster,
    finish_snakemake,
    local_slurm_cluster,
    start_snakemake_on_slurm,
    stop_snakemake,
    test_profile_from,
)
from tests.workflow.conftest import REPO, micro_config, run_snakemake

PROFILE_DIR = REPO / "profiles" / "slurm"
RUN = "results/demo"  # micro_config keeps config.demo.yaml's run_name
BASELINE = f"{RUN}/baseline/model.safetensors"
CELL_OUTPUTS = ("model.safetensors", "train_log.csv", "provenance.json")
# Set in the test config on purpose, so the sbatch request can be checked against known numbers
# (the profile's default-resources ask for 4000 MB / 60 min; the workflow's own values must win).
FINETUNE_MEM_MB = 1500
FINETUNE_RUNTIME_MIN = 10
# Two fake GPUs: both grid cells run at once (the node has 2 cores, each cell asks for one per GPU).
CLUSTER_GPUS = 2
# The preempted cell: long enough that the requeue lands mid-training even on a loaded machine.
PREEMPT_CELL = "alpha~2.0/tau~0.05/seed~0"
PREEMPT_STEPS = 80
REQUEUE_AFTER_STEP = 8
# The prepared inputs are reused by configs that differ in their finetune section, and the pretrain
# rule's params hold the whole config; only missing files may trigger a job, never a changed param.
REUSE_PREPARED_INPUTS = ("--rerun-triggers=mtime",)  # one word: the option takes several
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


# ------------------------------------------------------------------------------------------
# Configs and prepared work folders


def grid_config() -> dict:
    """micro_config's two cells (alpha 0 and 2, tau 0.05, seed 0) with known finetune resources."""
    config = micro_config()
    config["resources"] = {"finetune": {"mem_mb": FINETUNE_MEM_MB, "runtime": FINETUNE_RUNTIME_MIN}}
    return config


def preempt_config() -> dict:
    """One cell trained long enough to be requeued mid-run; checkpoints every 4 steps."""
    config = grid_config()
    config["finetune"].update(grid={"alpha": [2.0], "tau": [0.05], "seed": [0]}, steps=PREEMPT_STEPS)
    return config


def workflow_copy(prepared: Path, destination: Path, config: dict) -> Path:
    """A copy of the prepared folder (mtimes kept, so nothing upstream looks newer) with ``config``."""
    shutil.copytree(prepared, destination, symlinks=True)
    (destination / "config.yaml").write_text(yaml.safe_dump(config))
    return destination


def snakefile_args(workdir: Path) -> list[str]:
    return ["--snakefile", str(REPO / "Snakefile"), f"--configfile={workdir / 'config.yaml'}"]


def local_snakemake_command(workdir: Path, args: list[str]) -> list[str]:
    """Snakemake with the default (local) executor on the same Snakefile and config."""
    return [sys.executable, "-m", "snakemake", *args, *snakefile_args(workdir), *REUSE_PREPARED_INPUTS]


def cell_dir(workdir: Path, cell: str) -> Path:
    return workdir / RUN / "finetune" / cell


def cell_log(workdir: Path, cell: str) -> Path:
    return workdir / RUN / "logs" / "finetune" / f"{cell}.log"


def slurm_log(workdir: Path, cell: str, job_id: str) -> Path:
    """Where the profile's slurm-logdir puts a finetune job's log: rule_finetune/<cell, '/' as '_'>/<id>.log."""
    return workdir / "logs" / "slurm" / "rule_finetune" / cell.replace("/", "_") / f"{job_id}.log"


def cell_state(workdir: Path, cell: str) -> Path:
    return workdir / RUN / "state" / "finetune" / cell / "state.json"


# ------------------------------------------------------------------------------------------
# What the jobs saw


@dataclasses.dataclass(frozen=True)
class JobProcess:
    """A process of a running SLURM job, as `scontrol listpids` and /proc show it."""

    job_id: str
    step: str
    command: str
    cuda_visible_devices: str | None


def job_processes(cluster: LocalSlurmCluster, job_id: str) -> list[JobProcess]:
    """Every live process of ``job_id`` with its command line and CUDA_VISIBLE_DEVICES.

    Read from /proc because the training script writes nothing about its environment; processes
    that exit between the listing and the read are skipped.
    """
    listing = cluster.slurm("scontrol", "listpids", job_id, check=False).stdout
    processes = []
    for line in listing.splitlines()[1:]:  # header: PID JOBID STEPID LOCALID GLOBALID
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        try:
            command = Path(f"/proc/{fields[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{fields[0]}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        variables = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        processes.append(JobProcess(job_id, fields[2], command, variables.get("CUDA_VISIBLE_DEVICES")))
    return processes


def training_processes_seen(
    cluster: LocalSlurmCluster, process: subprocess.Popen[str], timeout_s: float, poll_s: float = 0.5
) -> dict[str, set[str | None]]:
    """Poll the running jobs until Snakemake exits: {job id: CUDA_VISIBLE_DEVICES of its trainer}.

    The trainer is the `script:` process Snakemake starts for workflow_scripts/train.py. Gives up
    polling after ``timeout_s``; the caller's finish_snakemake then reports the hang.
    """
    seen: dict[str, set[str | None]] = {}
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        for job in cluster.jobs():
            if job.state != "RUNNING":
                continue
            for proc in job_processes(cluster, job.job_id):
                if proc.command.rstrip().endswith("train.py") and ".snakemake/scripts" in proc.command:
                    seen.setdefault(job.job_id, set()).add(proc.cuda_visible_devices)
        time.sleep(poll_s)
    return seen


def submissions(snakemake_output: str) -> dict[str, Path]:
    """{SLURM job id: its SLURM log} for every job Snakemake submitted with sbatch."""
    return {job_id: Path(log) for job_id, log in SUBMITTED.findall(snakemake_output)}


def cell_of_job(details: dict[str, str]) -> str:
    """The grid cell of a finetune job, from the comment the plugin sets: its cell wildcard with '/' as '_'
    (rule_finetune_wildcards_alpha~2.0_tau~0.05_seed~0)."""
    match = re.fullmatch(r"rule_finetune_wildcards_(alpha~[^_]+)_(tau~[^_]+)_(seed~\d+)", details["Comment"].strip())
    assert match, details["Comment"]
    return "/".join(match.groups())


def wait_for_state_step(
    state_json: Path, at_least: int, process: subprocess.Popen[str], timeout_s: float
) -> int:
    """The step recorded in the trainer's resume state once it reaches ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if state_json.exists():
            try:
                step = int(json.loads(state_json.read_text())["step"])
            except (json.JSONDecodeError, KeyError):  # written atomically, but be safe
                step = -1
            if step >= at_least:
                return step
        time.sleep(0.2)
    raise TimeoutError(f"{state_json} did not reach step {at_least} while Snakemake ran")


def running_job_of_cell(cluster: LocalSlurmCluster, cell: str) -> str:
    running = [job.job_id for job in cluster.jobs() if job.state == "RUNNING"]
    owners = [job_id for job_id in running if cell_of_job(cluster.job_details(job_id)) == cell]
    assert len(owners) == 1, (cell, running)
    return owners[0]


def tensors_that_differ(first: Path, second: Path) -> list[str]:
    """Names of the tensors whose values differ (bit for bit) between two safetensors files."""
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys(), (first, second)
    return [key for key in a if not torch.equal(a[key], b[key])]


# ------------------------------------------------------------------------------------------
# Fixtures: one cluster, one profile and one CPU prep for the module


@pytest.fixture(scope="module")
def slurm_cluster(
    slurm_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSlurmCluster]:
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm_cluster"), gpus=CLUSTER_GPUS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return test_profile_from(PROFILE_DIR, tmp_path_factory.mktemp("slurm_profile"))


@pytest.fixture(scope="module")
def prepared_workflow(slurm_available: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder holding every input of the finetune cells, made locally (CPU prep, ~30 s)."""
    workdir = tmp_path_factory.mktemp("prepared")
    (workdir / "config.yaml").write_text(yaml.safe_dump(grid_config()))
    run_snakemake(
        BASELINE, "--cores", "2", f"--configfile={workdir / 'config.yaml'}", cwd=workdir, timeout=600
    )
    assert (workdir / BASELINE).is_file()
    return workdir


# ------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_grid_cells_train_as_gpu_jobs_through_sbatch(
    slurm_cluster: LocalSlurmCluster, slurm_profile: Path, prepared_workflow: Path, tmp_path: Path
) -> None:
    workdir = workflow_copy(prepared_workflow, tmp_path / "grid", grid_config())
    process = start_snakemake_on_slurm(
        slurm_cluster,
        workdir,
        slurm_profile,
        ["finetune_all"],
        [*snakefile_args(workdir), *REUSE_PREPARED_INPUTS],
    )
    try:
        devices_by_job = training_processes_seen(slurm_cluster, process, timeout_s=300)
        result = finish_snakemake(process, timeout_s=30)
    finally:
        if process.poll() is None:
            print(stop_snakemake(process)[-6000:])
    assert result.returncode == 0, result.stdout[-6000:]

    jobs = submissions(result.stdout)
    details = {job_id: slurm_cluster.job_details(job_id) for job_id in jobs}
    cells = {cell_of_job(job): job_id for job_id, job in details.items()}
    # Only the two cells were submitted: the prepared inputs were not rebuilt on the cluster.
    assert sorted(cells) == ["alpha~0.0/tau~0.05/seed~0", "alpha~2.0/tau~0.05/seed~0"], cells
    for cell, job_id in cells.items():
        for name in CELL_OUTPUTS:
            assert (cell_dir(workdir, cell) / name).is_file(), (cell, name)
        assert jobs[job_id] == slurm_log(workdir, cell, job_id)
        assert "rule finetune:" in jobs[job_id].read_text()  # slurm-keep-successful-logs kept it
        assert f"wrote {RUN}/finetune/" in cell_log(workdir, cell).read_text()
        job = details[job_id]
        assert job["JobState"] == "COMPLETED", job
        assert job["Partition"] == LOCAL_PARTITION
        assert job["TresPerJob"] == "gres:gpu:1", job  # set-resources finetune: gpu: 1 -> --gpus=1
        assert job["CpusPerTres"] == f"gres:gpu:{LOCAL_EDIT_VALUES['cpus_per_gpu']}"
        # The workflow's resources (this config) beat the profile's default-resources.
        assert job["MinMemoryNode"] == f"{FINETUNE_MEM_MB}M", job
        assert job["TimeLimit"] == f"00:{FINETUNE_RUNTIME_MIN:02d}:00", job
        # The trainer itself (not only the batch shell) was given one of the fake GPUs.
        assert devices_by_job.get(job_id) in ({"0"}, {"1"}), devices_by_job
    if _overlapped(*details.values()):
        assert (
            devices_by_job[cells["alpha~0.0/tau~0.05/seed~0"]]
            != devices_by_job[cells["alpha~2.0/tau~0.05/seed~0"]]
        )


def _overlapped(first: dict[str, str], second: dict[str, str]) -> bool:
    """Whether two finished jobs ran at the same time (ISO timestamps compare as strings)."""
    return first["StartTime"] < second["EndTime"] and second["StartTime"] < first["EndTime"]


@pytest.mark.slow
def test_requeued_training_job_resumes_and_ends_with_uninterrupted_weights(
    slurm_cluster: LocalSlurmCluster, slurm_profile: Path, prepared_workflow: Path, tmp_path: Path
) -> None:
    target = f"{RUN}/finetune/{PREEMPT_CELL}/model.safetensors"
    preempted = workflow_copy(prepared_workflow, tmp_path / "preempted", preempt_config())
    uninterrupted = workflow_copy(prepared_workflow, tmp_path / "uninterrupted", preempt_config())
    process = start_snakemake_on_slurm(
        slurm_cluster,
        preempted,
        slurm_profile,
        [target],
        [*snakefile_args(preempted), *REUSE_PREPARED_INPUTS],
    )
    # The twin trains locally meanwhile, on the core the cluster job leaves free.
    reference = subprocess.Popen(
        local_snakemake_command(uninterrupted, [target, "--cores", "1"]),
        cwd=uninterrupted,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        requeued_at = wait_for_state_step(
            cell_state(preempted, PREEMPT_CELL), REQUEUE_AFTER_STEP, process, 180
        )
        job_id = running_job_of_cell(slurm_cluster, PREEMPT_CELL)
        slurm_cluster.requeue(job_id, release=False)
        # The rerun starts both logs afresh: keep what the killed run wrote before letting it go.
        killed_rule_log = cell_log(preempted, PREEMPT_CELL).read_text()
        killed_slurm_log = slurm_log(preempted, PREEMPT_CELL, job_id).read_text()
        slurm_cluster.release_requeued(job_id)
        result = finish_snakemake(process, timeout_s=300)
        reference_output, _ = reference.communicate(timeout=300)
    finally:
        for proc in (process, reference):
            if proc.poll() is None:  # the test failed mid-run: leave no Snakemake behind
                print(stop_snakemake(proc)[-6000:])
    assert result.returncode == 0, result.stdout[-6000:]
    assert reference.returncode == 0, reference_output[-6000:]

    # The killed run: SLURM's SIGTERM reached the trainer, which saved its state and exited non-zero.
    assert "DUE TO JOB REQUEUE" in killed_slurm_log, killed_slurm_log[-3000:]
    assert "signal 15 received" in killed_rule_log, killed_rule_log[-3000:]
    assert "Preempted: stopped by signal 15" in killed_rule_log
    saved_at = int(re.findall(r"saved resume state at step (\d+)", killed_rule_log)[-1])
    assert saved_at >= requeued_at
    # SLURM reran the same job (sbatch --requeue from the profile): Snakemake submitted it once and
    # never saw a failure, so its own `retries` played no part.
    assert list(submissions(result.stdout)) == [job_id], result.stdout[-6000:]
    assert "Error in rule" not in result.stdout
    details = slurm_cluster.job_details(job_id)
    assert (details["Restarts"], details["JobState"]) == ("1", "COMPLETED"), details
    # The rerun resumed exactly where the killed run saved, and finished the cell.
    rule_log = cell_log(preempted, PREEMPT_CELL).read_text()
    resumed = re.findall(rf"resuming from {RUN}/state/finetune/(\S+) at step (\d+)", rule_log)
    assert resumed == [(PREEMPT_CELL, str(saved_at))], rule_log[-3000:]
    log_rows = (cell_dir(preempted, PREEMPT_CELL) / "train_log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in log_rows] == list(range(1, PREEMPT_STEPS + 1))
    assert "resuming from" not in (cell_log(uninterrupted, PREEMPT_CELL)).read_text()
    assert not cell_state(preempted, PREEMPT_CELL).parent.exists()  # finished: its state is gone
    assert (
        tensors_that_differ(cell_dir(uninterrupted, PREEMPT_CELL) / "model.safetensors", preempted / target)
        == []
    )
    # Not trivially equal: training moved the weights away from the baseline both runs started from.
    assert tensors_that_differ(preempted / BASELINE, preempted / target)
