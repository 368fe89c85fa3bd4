"""profiles/slurm on a real single-node SLURM cluster (tests/slurm_cluster.py).

The profile tests at the top are fast and need no cluster. The `slow` tests start munged,
slurmctld and slurmd once for the module, run tests/workflow/slurm_smoke through
`snakemake --executor slurm` with a copy of the real profile, and check what the jobs saw.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.slurm_cluster import (
    LOCAL_EDIT_VALUES,
    LOCAL_PARTITION,
    PROFILE_FILE,
    REMOVE,
    TEST_SPEED_OVERRIDES,
    LocalSlurmCluster,
    edit_marked_paths,
    finish_snakemake,
    flatten_profile,
    is_alive,
    local_slurm_cluster,
    read_profile,
    run_snakemake_on_slurm,
    start_snakemake_on_slurm,
    stop_snakemake,
    test_profile_from,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / "profiles" / "slurm"
SMOKE_WORKFLOW = Path(__file__).resolve().parent / "slurm_smoke"
GPU_RULES = (
    "finetune",
    "pretrain",
    "pretrain_llava",
    "evaluate_encoder",
    "vqa",
)
SLOW_RULE_SECONDS = 20
RULE_HEADER = re.compile(r"^\s*rule\s+(\w+)\s*:", re.MULTILINE)


# ------------------------------------------------------------------------------------------
# The profile itself (no cluster needed)


def test_edit_marked_paths_follow_indentation() -> None:
    text = (
        "jobs: 5  # not a site fact\n"
        "default-resources:\n"
        "  # comment lines are skipped\n"
        "  slurm_partition: cpu  # EDIT: yours\n"
        "  runtime: 60\n"
        "set-resources:\n"
        "  finetune:\n"
        "    gpu: 1\n"
        "    slurm_partition: gpu  # EDIT\n"
        "top: 1  # EDIT\n"
    )
    assert edit_marked_paths(text) == [
        ("default-resources", "slurm_partition"),
        ("set-resources", "finetune", "slurm_partition"),
        ("top",),
    ]


def test_profile_marks_partitions_account_and_gpu_cores_as_site_facts() -> None:
    tree, edit_paths = read_profile(PROFILE_DIR)
    expected = {("default-resources", "slurm_partition"), ("default-resources", "slurm_account")}
    for rule in GPU_RULES:
        expected |= {("set-resources", rule, "slurm_partition"), ("set-resources", rule, "cpus_per_gpu")}
    assert edit_paths == expected
    assert tree["executor"] == "slurm"
    assert tree["slurm-requeue"] is True
    # Left to the plugin's default on purpose (sacct on real clusters), see the profile comment.
    assert "slurm-status-command" not in tree


def test_profile_gives_every_gpu_rule_one_gpu_on_the_gpu_partition() -> None:
    tree, _ = read_profile(PROFILE_DIR)
    assert set(tree["set-resources"]) == set(GPU_RULES)
    for rule in GPU_RULES:
        resources = tree["set-resources"][rule]
        assert resources["gpu"] == 1, rule
        assert resources["slurm_partition"] != tree["default-resources"]["slurm_partition"], rule
        # Non-zero cpus_per_task would make the plugin ignore cpus_per_gpu.
        assert resources["cpus_per_task"] == 0, rule
        # Memory and runtime are the workflow's business (rules/common.smk), not the profile's.
        assert not {"mem_mb", "runtime"} & set(resources), rule


def rules_declaring_a_gpu(rule_files: list[Path]) -> set[str]:
    """Names of the rules whose body (up to the next `rule`) asks for a GPU: `job_resources(…, gpu=True)`."""
    names = set()
    for rule_file in rule_files:
        text = rule_file.read_text()
        headers = list(RULE_HEADER.finditer(text))
        for header, following in zip(headers, [*headers[1:], None]):
            body = text[header.end() : following.start() if following else len(text)]
            if re.search(r"^\s*\*\*job_resources\([^)]*\bgpu=True\)", body, re.MULTILINE):
                names.add(header.group(1))
    return names


def test_rules_declaring_a_gpu_finds_only_gpu_rules(tmp_path: Path) -> None:
    smk = tmp_path / "stage.smk"
    smk.write_text(
        "rule cpu_one:\n    resources:\n        **job_resources('a'),\n"
        "if X:\n\n    rule gpu_one:\n        resources:\n            **job_resources('a', gpu=True),\n"
        "rule cpu_two:\n    params:\n        gpu=True,\n"
        "rule cpu_three:\n    resources:\n        **job_resources('a', gpu=False),\n"
    )
    assert rules_declaring_a_gpu([smk]) == {"gpu_one"}


def test_the_profile_lists_exactly_the_workflow_rules_that_declare_a_gpu() -> None:
    gpu_rules = rules_declaring_a_gpu(sorted((REPO_ROOT / "rules").glob("*.smk")))
    tree, _ = read_profile(PROFILE_DIR)
    listed = set(tree["set-resources"])
    assert not gpu_rules - listed, f"GPU rules without a set-resources entry in profiles/slurm: {sorted(gpu_rules - listed)}"
    assert not listed - gpu_rules, f"profiles/slurm lists rules no rules/*.smk declares a GPU for: {sorted(listed - gpu_rules)}"
    assert gpu_rules == set(GPU_RULES)


def test_generated_profile_differs_only_in_edit_values_and_polling_speed(tmp_path: Path) -> None:
    real, edit_paths = read_profile(PROFILE_DIR)
    generated = yaml.safe_load((test_profile_from(PROFILE_DIR, tmp_path) / PROFILE_FILE).read_text())
    real_flat, generated_flat = flatten_profile(real), flatten_profile(generated)
    speed_paths = {(key,) for key in TEST_SPEED_OVERRIDES}
    allowed = edit_paths | speed_paths

    def without_allowed(flat: dict) -> dict:
        return {path: value for path, value in flat.items() if path not in allowed}

    assert without_allowed(generated_flat) == without_allowed(real_flat)
    for path in edit_paths:
        wanted = LOCAL_EDIT_VALUES[path[-1]]
        if wanted is REMOVE:
            assert path not in generated_flat, path
        else:
            assert generated_flat[path] == wanted, path
    for key, value in TEST_SPEED_OVERRIDES.items():
        assert generated_flat[(key,)] == value, key


def test_generated_profile_refuses_an_edit_key_without_a_local_value(tmp_path: Path) -> None:
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    (profile_dir / PROFILE_FILE).write_text("default-resources:\n  slurm_qos: gold  # EDIT: your QoS\n")
    with pytest.raises(KeyError, match=r"default-resources\.slurm_qos.*LOCAL_EDIT_VALUES"):
        test_profile_from(profile_dir, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# The profile on a real cluster


@pytest.fixture(scope="module")
def slurm_cluster(
    slurm_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSlurmCluster]:
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm_cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return test_profile_from(PROFILE_DIR, tmp_path_factory.mktemp("slurm_profile"))


@pytest.fixture
def smoke_workflow(tmp_path: Path) -> Path:
    workflow_dir = tmp_path / "workflow"
    shutil.copytree(SMOKE_WORKFLOW, workflow_dir)
    return workflow_dir


@pytest.mark.slow
def test_cluster_stops_its_daemons_when_the_body_fails(slurm_available: None, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="test body failed"):
        with local_slurm_cluster(tmp_path / "cluster") as cluster:
            pids = cluster.daemon_pids()
            munge_dir = cluster.layout.munge_dir
            assert cluster.node_state() == "idle"
            assert all(pid is not None and is_alive(pid) for pid in pids.values()), pids
            raise RuntimeError("test body failed")
    assert not [daemon for daemon, pid in pids.items() if is_alive(pid)]
    assert not munge_dir.exists()


def read_key_values(path: Path) -> dict[str, str]:
    """``key=value`` lines written by the smoke rules."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.mark.slow
def test_workflow_jobs_go_through_sbatch_and_the_gpu_rule_gets_a_gpu(
    slurm_cluster: LocalSlurmCluster, slurm_profile: Path, smoke_workflow: Path
) -> None:
    result = run_snakemake_on_slurm(slurm_cluster, smoke_workflow, slurm_profile, ["all"], timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]

    seen = read_key_values(smoke_workflow / "results" / "summary.txt")
    assert re.fullmatch(r"\d+", seen["gpu_job_id"]), seen
    assert re.fullmatch(r"\d+", seen["cpu_job_id"]), seen
    assert seen["gpu_job_id"] != seen["cpu_job_id"]
    assert seen["cuda_visible_devices"] == "0"  # the fake GPU, granted through --gpus=1
    assert seen["partition"] == LOCAL_PARTITION
    # slurm-logdir and slurm-keep-successful-logs from the profile: logs of successful jobs stay.
    for rule, job_id in (("finetune", seen["gpu_job_id"]), ("summarize", seen["cpu_job_id"])):
        assert (smoke_workflow / "logs" / "slurm" / f"rule_{rule}" / f"{job_id}.log").is_file()

    jobs = {job.job_id: job for job in slurm_cluster.jobs()}
    for job_id in (seen["gpu_job_id"], seen["cpu_job_id"]):
        assert jobs[job_id].state == "COMPLETED", jobs[job_id]
        assert jobs[job_id].name.startswith("hnclip_"), jobs[job_id]  # the profile's prefix
    gpu_job = slurm_cluster.job_details(seen["gpu_job_id"])
    assert gpu_job["Partition"] == LOCAL_PARTITION
    assert "gpu:1" in gpu_job["TresPerJob"]
    # cpus_per_gpu from the profile's set-resources reached sbatch (cpus_per_task: 0 let it).
    assert gpu_job["CpusPerTres"] == f"gres:gpu:{LOCAL_EDIT_VALUES['cpus_per_gpu']}"
    cpu_job = slurm_cluster.job_details(seen["cpu_job_id"])
    assert "gpu" not in cpu_job.get("TresPerJob", "")
    assert cpu_job["Requeue"] == "1"  # slurm-requeue: true became sbatch --requeue


def wait_for_lines(path: Path, count: int, process: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """Lines of ``path`` once it has ``count``; gives up early if ``process`` has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(lines := path.read_text().splitlines()) >= count:
            return lines
        time.sleep(0.5)
    raise TimeoutError(f"{path} did not reach {count} line(s) while Snakemake ran")


@pytest.mark.slow
def test_requeued_job_runs_again_and_the_workflow_still_finishes(
    slurm_cluster: LocalSlurmCluster, slurm_profile: Path, smoke_workflow: Path
) -> None:
    marker = smoke_workflow / "markers" / "slow_counter_starts.txt"
    process = start_snakemake_on_slurm(
        slurm_cluster,
        smoke_workflow,
        slurm_profile,
        ["results/slow_done.txt"],
        ["--config", f"slow_seconds={SLOW_RULE_SECONDS}"],
    )
    try:
        first_start = wait_for_lines(marker, 1, process, timeout_s=120)
        job_id = first_start[0].removeprefix("start job=")
        slurm_cluster.requeue(job_id)
        result = finish_snakemake(process, timeout_s=300)
    finally:
        if process.poll() is None:  # the test failed mid-run: leave no Snakemake behind
            print(stop_snakemake(process)[-6000:])

    assert result.returncode == 0, result.stdout[-6000:]
    # Two starts of the same SLURM job: SLURM reran it, Snakemake did not resubmit it.
    assert marker.read_text().splitlines() == [f"start job={job_id}"] * 2
    assert slurm_cluster.job_details(job_id)["Restarts"] == "1"
    assert (smoke_workflow / "results" / "slow_done.txt").read_text() == f"finished job={job_id}\n"
