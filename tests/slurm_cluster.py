"""A real single-node SLURM cluster living in a test's own folder, and helpers to run Snakemake on it.

Why a real cluster: the SLURM profile is only worth shipping if Snakemake really submits through
``sbatch``, gets a (fake) GPU, and survives a requeue. Mocking ``sbatch`` tests none of that.

Everything lives under the folder the caller passes (config, state, logs, pidfiles, munge key),
except munge's socket folder (see ClusterLayout); nothing is written to /etc and no system service
is touched. Daemons are started directly
(there is no systemd) and stopped by the PID from their own pidfile, never by name. The traps this
design avoids are recorded in docs/slurm.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMON_BINARIES = ("munged", "slurmctld", "slurmd")
# Every client Snakemake or a test calls; each gets a wrapper that pins SLURM_CONF, because the
# slurm jobstep plugin strips SLURM_* from the environment before its inner `srun`.
CLIENT_COMMANDS = ("srun", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
LOCAL_PARTITION = "local"
CLUSTER_NAME = "hncliptest"
PROFILE_FILE = "config.v8+.yaml"
EDIT_MARKER = "# EDIT"

# Polling keys that only make the test fast; the real profile keeps the plugin's cautious defaults.
# squeue is the status command because this cluster has no slurmdbd, so `sacct` exits 1 and the
# plugin would wait forever (docs/slurm.md). squeue mode needs MinJobAge >= 3 x the initial delay.
TEST_SPEED_OVERRIDES: dict[str, Any] = {
    "slurm-init-seconds-before-status-checks": 8,
    "seconds-between-status-checks": 8,
    "latency-wait": 5,
    "slurm-status-command": "squeue",
}
MIN_JOB_AGE_S = 300


class _Remove:
    """Sentinel: an `# EDIT` key whose line is dropped in the test profile (e.g. the account)."""

    def __repr__(self) -> str:
        return "REMOVE"


REMOVE = _Remove()

# What each `# EDIT` key of profiles/slurm becomes on the local cluster. A key marked `# EDIT` in
# the profile but missing here makes test_profile_from fail, so a new site fact gets a decision.
LOCAL_EDIT_VALUES: dict[str, Any] = {
    "slurm_partition": LOCAL_PARTITION,
    # Accounts are validated with sacctmgr/sshare, which need slurmdbd; this cluster has none.
    "slurm_account": REMOVE,
    # The local node has as few as 2 cores; asking for more per GPU would never schedule.
    "cpus_per_gpu": 1,
}


class SlurmSetupError(RuntimeError):
    """The local cluster could not be brought up; the message carries the relevant log tail."""


# --------------------------------------------------------------------------------------------
# Installation


def ensure_slurm_installed() -> str | None:
    """Install SLURM and munge with apt if they are missing.

    Returns None when the cluster can be started, else the reason to skip with.
    """
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (daemons run as SlurmUser=root)"
    if _missing_binaries():
        if shutil.which("apt-get") is None:
            return f"SLURM binaries {_missing_binaries()} are missing and there is no apt-get"
        failure = _apt_install(APT_PACKAGES)
        if failure:
            return failure
    if _missing_binaries():
        return f"SLURM binaries still missing after apt-get install: {_missing_binaries()}"
    return None


def _missing_binaries() -> list[str]:
    needed = (*DAEMON_BINARIES, *CLIENT_COMMANDS, "mknod")
    return [name for name in needed if shutil.which(name) is None]


def _apt_install(packages: Sequence[str]) -> str | None:
    """Run apt-get update + install; return a skip reason on failure (e.g. no registry access)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    )
    for command in commands:
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{shlex.join(command)}` took over 10 minutes"
        if result.returncode != 0:
            return f"`{shlex.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return None


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What `slurmd -C` reports about this machine, in slurm.conf's own words."""

    name: str
    cpus: int
    boards: int
    sockets_per_board: int
    cores_per_socket: int
    threads_per_core: int
    real_memory_mb: int


def read_node_facts() -> NodeFacts:
    """Parse the first line of `slurmd -C` (``NodeName=vm CPUs=2 ... RealMemory=24105``)."""
    output = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(token.split("=", 1) for token in output.splitlines()[0].split() if "=" in token)
    try:
        return NodeFacts(
            name=fields["NodeName"],
            cpus=int(fields["CPUs"]),
            boards=int(fields["Boards"]),
            sockets_per_board=int(fields["SocketsPerBoard"]),
            cores_per_socket=int(fields["CoresPerSocket"]),
            threads_per_core=int(fields["ThreadsPerCore"]),
            real_memory_mb=int(fields["RealMemory"]),
        )
    except KeyError as missing:
        raise SlurmSetupError(f"`slurmd -C` output lacks {missing}: {output!r}") from None


@dataclasses.dataclass(frozen=True)
class ClusterLayout:
    """Every path the cluster uses: all under ``root`` except munge's socket folder.

    munged demands execute permission for all on every folder above its socket, which pytest's
    private (mode 700) tmp folders lack, so the socket gets its own short-lived folder in /tmp.
    """

    root: Path
    munge_dir: Path

    @property
    def conf_path(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def gres_conf_path(self) -> Path:
        # slurmd looks for gres.conf beside slurm.conf.
        return self.root / "etc" / "gres.conf"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def fake_gpu_device(self, index: int) -> Path:
        return self.root / "dev" / f"nvidia{index}"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge-key" / "munge.key"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def pidfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"


def free_tcp_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on now, so two clusters (or a system one) never collide.

    All probes stay bound until every port is chosen; otherwise the kernel may hand out one twice.
    """
    with contextlib.ExitStack() as stack:
        probes = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def slurm_conf_text(layout: ClusterLayout, node: NodeFacts, ports: tuple[int, int], gpus: int) -> str:
    """The smallest slurm.conf that schedules CPU, memory and ``gpus`` fake GPUs on this machine."""
    real_memory = int(node.real_memory_mb * 0.95)  # headroom so slurmd does not drain the node
    # Without a default, a job lacking --mem takes the whole node and jobs run one at a time.
    def_mem_per_cpu = max(100, min(1024, real_memory // (2 * node.cpus)))
    ctld_port, slurmd_port = ports
    lines = [
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={node.name}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"StateSaveLocation={layout.state_dir / 'slurmctld'}",
        f"SlurmdSpoolDir={layout.state_dir / 'slurmd'}",
        f"SlurmctldPidFile={layout.pidfile('slurmctld')}",
        f"SlurmdPidFile={layout.pidfile('slurmd')}",
        f"SlurmctldLogFile={layout.logfile('slurmctld')}",
        f"SlurmdLogFile={layout.logfile('slurmd')}",
        # No cgroups in a container: track processes by parent PID, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={def_mem_per_cpu}",
        # Finished jobs stay visible to squeue this long; the squeue status mode relies on it.
        f"MinJobAge={MIN_JOB_AGE_S}",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "GresTypes=gpu",
        (
            f"NodeName={node.name} NodeAddr=127.0.0.1 CPUs={node.cpus} Boards={node.boards}"
            f" SocketsPerBoard={node.sockets_per_board} CoresPerSocket={node.cores_per_socket}"
            f" ThreadsPerCore={node.threads_per_core} RealMemory={real_memory}"
            f" Gres=gpu:{gpus} State=UNKNOWN"
        ),
        f"PartitionName={LOCAL_PARTITION} Nodes={node.name} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def gres_conf_text(layout: ClusterLayout, node: NodeFacts, gpus: int) -> str:
    # Without File= slurmd silently drops the GPU and the node drains (docs/slurm.md).
    return "".join(
        f"NodeName={node.name} Name=gpu File={layout.fake_gpu_device(index)}\n" for index in range(gpus)
    )


def write_client_wrappers(bin_dir: Path, conf_path: Path) -> None:
    """Put `srun`, `sbatch`, ... wrappers in ``bin_dir`` that pin SLURM_CONF, then exec the real one."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in CLIENT_COMMANDS:
        real = _real_binary(command, bin_dir)
        wrapper = bin_dir / command
        wrapper.write_text(
            "#!/bin/sh\n"
            "# Generated by tests/slurm_cluster.py: jobs lose SLURM_CONF, this puts it back.\n"
            f'SLURM_CONF={shlex.quote(str(conf_path))} exec {shlex.quote(real)} "$@"\n'
        )
        wrapper.chmod(0o755)


def _real_binary(command: str, wrapper_dir: Path) -> str:
    """The installed binary, skipping our own wrapper dir so a wrapper never execs itself."""
    search_path = os.pathsep.join(
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != wrapper_dir.resolve()
    )
    found = shutil.which(command, path=search_path)
    if found is None:
        raise SlurmSetupError(f"`{command}` not found on PATH; run ensure_slurm_installed() first")
    return found


def prepare_layout(layout: ClusterLayout, node: NodeFacts, gpus: int) -> None:
    """Create folders, the munge key, the fake GPU devices and both config files."""
    for folder in (
        layout.run_dir,
        layout.log_dir,
        layout.state_dir / "slurmctld",
        layout.state_dir / "slurmd",
        layout.conf_path.parent,
        layout.fake_gpu_device(0).parent,
        layout.munge_key.parent,
    ):
        folder.mkdir(parents=True, exist_ok=True)
    # munged refuses a socket folder without execute permission for all.
    layout.munge_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    layout.munge_dir.chmod(0o755)
    layout.munge_key.parent.chmod(0o700)
    layout.munge_key.write_bytes(os.urandom(1024))
    layout.munge_key.chmod(0o400)
    for index in range(gpus):
        if not layout.fake_gpu_device(index).exists():
            # A character-device clone of /dev/null (major 1, minor 3): enough for gres File=.
            subprocess.run(["mknod", str(layout.fake_gpu_device(index)), "c", "1", "3"], check=True)
    ctld_port, slurmd_port = free_tcp_ports(2)
    layout.conf_path.write_text(slurm_conf_text(layout, node, (ctld_port, slurmd_port), gpus))
    layout.gres_conf_path.write_text(gres_conf_text(layout, node, gpus))
    write_client_wrappers(layout.bin_dir, layout.conf_path)


# --------------------------------------------------------------------------------------------
# Daemons


def start_daemon(command: Sequence[str], pidfile: Path, logfile: Path, timeout_s: float = 20) -> int:
    """Run a self-forking daemon and return the PID it writes to ``pidfile``."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SlurmSetupError(
            f"`{shlex.join(command)}` exited {result.returncode}: {result.stderr.strip()}\n"
            f"{_tail(logfile)}"
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = read_pidfile(pidfile)
        if pid is not None and is_alive(pid):
            return pid
        time.sleep(0.1)
    raise SlurmSetupError(f"`{command[0]}` wrote no live PID to {pidfile}\n{_tail(logfile)}")


def read_pidfile(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def stop_daemon_from_pidfile(pidfile: Path, daemon: str, timeout_s: float = 15) -> None:
    """SIGTERM the PID in ``pidfile`` (SIGKILL after ``timeout_s``) if it still is ``daemon``.

    The name check guards against a recycled PID: we never signal a process we did not start.
    """
    pid = read_pidfile(pidfile)
    if pid is None or not is_alive(pid) or daemon not in _process_name(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_alive(pid):
        time.sleep(0.1)
    if is_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state_line = next((line for line in status.splitlines() if line.startswith("State:")), "State: ?")
    return state_line.split()[1] != "Z"


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return f"--- last lines of {path} ---\n" + "\n".join(path.read_text().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The cluster


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """One line of `squeue --states=all`: finished jobs stay listed for MinJobAge seconds."""

    job_id: str
    state: str
    name: str
    comment: str


@dataclasses.dataclass
class LocalSlurmCluster:
    """Handle on a running local cluster: environment for clients and small admin helpers."""

    layout: ClusterLayout
    node_name: str
    partition: str
    env: dict[str, str]

    @property
    def conf_path(self) -> Path:
        return self.layout.conf_path

    @property
    def bin_dir(self) -> Path:
        return self.layout.bin_dir

    def daemon_pids(self) -> dict[str, int | None]:
        """PID of each daemon as its pidfile names it (None before start / after a clean stop)."""
        return {daemon: read_pidfile(self.layout.pidfile(daemon)) for daemon in DAEMON_BINARIES}

    def slurm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``scontrol show node``) against this cluster."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise SlurmSetupError(f"`{shlex.join(args)}` exited {result.returncode}: {result.stderr.strip()}")
        return result

    def node_state(self) -> str:
        """The node's state in lower case (``idle``, ``mixed``, ``drained``); "" if sinfo fails."""
        sinfo = ("sinfo", "--noheader", "--Node", "--nodes", self.node_name, "--format=%T")
        return self.slurm(*sinfo, check=False).stdout.strip().lower()

    def wait_for_idle_node(self, timeout_s: float = 60) -> None:
        """Block until the node accepts jobs; resume it if it came up drained or down."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            if "drain" in state or state.startswith("down"):
                self.slurm("scontrol", "update", f"nodename={self.node_name}", "state=resume", check=False)
            time.sleep(0.5)
        raise SlurmSetupError(
            f"node {self.node_name} not idle after {timeout_s:.0f} s (last state {state!r})\n"
            f"{_tail(self.layout.logfile('slurmctld'))}\n{_tail(self.layout.logfile('slurmd'))}"
        )

    def jobs(self) -> list[SlurmJob]:
        """Every job slurmctld still remembers, running or finished less than MinJobAge ago."""
        output = self.slurm("squeue", "--noheader", "--states=all", "--format=%i|%T|%j|%k").stdout
        jobs = []
        for line in output.splitlines():
            job_id, state, name, comment = line.split("|", 3)
            jobs.append(SlurmJob(job_id.strip(), state.strip(), name.strip(), comment.strip()))
        return jobs

    def job_details(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (``Restarts``, ``Partition``, ``TresPerJob``, ...)."""
        output = self.slurm("scontrol", "--oneliner", "show", "job", job_id).stdout
        details: dict[str, str] = {}
        last_key = None
        for token in output.split():
            key, sep, value = token.partition("=")
            if sep and key[:1].isalpha():
                details[key] = value
                last_key = key
            elif last_key is not None:
                # A value with spaces (e.g. a comment) continues until the next key=value.
                details[last_key] += f" {token}"
        return details

    def requeue(self, job_id: str, timeout_s: float = 60, release: bool = True) -> None:
        """Kill a running batch job and put it back in the queue, as a preempting admin would.

        SLURM holds a requeued job for about two minutes (Reason=BeginTime), set once the old
        run has finished COMPLETING; tests release it as soon as it is PENDING to stay short.
        With ``release=False`` it stays held until ``release_requeued``: the rerun truncates the
        job's logs, so a test reads what the killed run left behind in between.
        """
        self.slurm("scontrol", "requeue", job_id)
        deadline = time.monotonic() + timeout_s
        while self.job_details(job_id).get("JobState") != "PENDING":
            if time.monotonic() > deadline:
                raise SlurmSetupError(f"job {job_id} not PENDING {timeout_s:.0f} s after requeue")
            time.sleep(0.2)
        if release:
            self.release_requeued(job_id)

    def release_requeued(self, job_id: str) -> None:
        """Let a requeued job start now instead of after SLURM's hold."""
        self.slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def cancel_all_jobs(self, timeout_s: float = 30) -> None:
        """Cancel every unfinished job and wait until none runs, so no job step outlives slurmd."""
        active = [job.job_id for job in self.jobs() if job.state in _UNFINISHED_STATES]
        if active:
            self.slurm("scancel", *active, check=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(job.state in _UNFINISHED_STATES for job in self.jobs()):
                return
            time.sleep(0.5)


_UNFINISHED_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "STOPPED",
}


def cluster_env(layout: ClusterLayout) -> dict[str, str]:
    """Environment for clients and Snakemake: our config, our wrappers first, no inherited job."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["SLURM_CONF"] = str(layout.conf_path)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(layout.bin_dir), venv_bin, env.get("PATH", "")])
    return env


@contextlib.contextmanager
def local_slurm_cluster(
    workdir: Path, gpus: int = 1, idle_timeout_s: float = 60
) -> Iterator[LocalSlurmCluster]:
    """Start munged, slurmctld and slurmd configured under ``workdir``; stop them all on exit.

    ``gpus`` fake GPUs (no CUDA behind them) make SLURM run that many `gpu=1` jobs at once and set
    CUDA_VISIBLE_DEVICES; code inside the jobs still sees no usable CUDA device.

    Teardown runs even when the body (or a later startup step) fails: each daemon's stop is
    registered before it starts, and it stops the PID its own pidfile names.
    """
    reason = ensure_slurm_installed()
    if reason:
        raise SlurmSetupError(reason)
    node = read_node_facts()
    with contextlib.ExitStack() as stack:
        munge_dir = Path(tempfile.mkdtemp(prefix="hnclip-munge-", dir=_world_traversable_tmp()))
        stack.callback(shutil.rmtree, munge_dir, ignore_errors=True)
        layout = ClusterLayout(Path(workdir).resolve(), munge_dir)
        prepare_layout(layout, node, gpus)
        cluster = LocalSlurmCluster(layout, node.name, LOCAL_PARTITION, cluster_env(layout))
        stack.callback(stop_daemon_from_pidfile, layout.pidfile("munged"), "munged")
        start_daemon(
            [
                "munged",
                f"--socket={layout.munge_socket}",
                f"--key-file={layout.munge_key}",
                f"--pid-file={layout.pidfile('munged')}",
                f"--log-file={layout.logfile('munged')}",
                f"--seed-file={layout.state_dir / 'munged.seed'}",
            ],
            layout.pidfile("munged"),
            layout.logfile("munged"),
        )
        stack.callback(stop_daemon_from_pidfile, layout.pidfile("slurmctld"), "slurmctld")
        start_daemon(
            ["slurmctld", "-f", str(layout.conf_path)],
            layout.pidfile("slurmctld"),
            layout.logfile("slurmctld"),
        )
        stack.callback(stop_daemon_from_pidfile, layout.pidfile("slurmd"), "slurmd")
        # Jobs are cancelled before slurmd stops so no slurmstepd is left orphaned.
        stack.callback(_cancel_quietly, cluster)
        start_daemon(
            ["slurmd", "-f", str(layout.conf_path)], layout.pidfile("slurmd"), layout.logfile("slurmd")
        )
        cluster.wait_for_idle_node(idle_timeout_s)
        yield cluster


def _world_traversable_tmp() -> str:
    """/tmp (mode 1777) when present: TMPDIR may point into a private folder munged rejects."""
    return "/tmp" if Path("/tmp").is_dir() else tempfile.gettempdir()


def _cancel_quietly(cluster: LocalSlurmCluster) -> None:
    with contextlib.suppress(SlurmSetupError, subprocess.SubprocessError, OSError):
        cluster.cancel_all_jobs()


# --------------------------------------------------------------------------------------------
# Profiles


def edit_marked_paths(profile_text: str) -> list[tuple[str, ...]]:
    """Key paths of the block-style YAML lines carrying an ``# EDIT`` comment.

    ``set-resources: / finetune: / slurm_partition: gpu  # EDIT`` gives
    ``("set-resources", "finetune", "slurm_partition")``. Indentation gives the nesting.
    """
    stack: list[tuple[int, str]] = []
    paths = []
    for line in profile_text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        key = stripped.split(":", 1)[0].strip().strip("'\"")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if EDIT_MARKER in line:
            paths.append(tuple(k for _, k in stack))
    return paths


def flatten_profile(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{"a": {"b": 1}}`` -> ``{("a", "b"): 1}``; YAML aliases appear under every path using them."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(flatten_profile(value, path))
        else:
            flat[path] = value
    return flat


def expand_through_aliases(tree: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Every path reaching the same value as ``paths``: `pretrain: *gpu_rule` shares finetune's keys."""
    containers_by_id: dict[int, list[tuple[str, ...]]] = {}

    def collect(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        containers_by_id.setdefault(id(node), []).append(path)
        for key, value in node.items():
            if isinstance(value, Mapping):
                collect(value, (*path, str(key)))

    collect(tree, ())
    expanded = set()
    for path in paths:
        container = _lookup(tree, path[:-1])
        for container_path in containers_by_id[id(container)]:
            expanded.add((*container_path, path[-1]))
    return expanded


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


def read_profile(profile_dir: Path) -> tuple[dict[str, Any], set[tuple[str, ...]]]:
    """The profile as loaded by Snakemake (PyYAML) and the full set of its `# EDIT` key paths."""
    profile_file = Path(profile_dir) / PROFILE_FILE
    text = profile_file.read_text()
    tree = yaml.safe_load(text)
    if not isinstance(tree, dict):
        raise ValueError(f"{profile_file}: expected a mapping at top level, got {type(tree).__name__}")
    return tree, expand_through_aliases(tree, edit_marked_paths(text))


def test_profile_from(
    profile_dir: Path,
    out_dir: Path,
    overrides: Mapping[str, Any] = TEST_SPEED_OVERRIDES,
    edit_values: Mapping[str, Any] = LOCAL_EDIT_VALUES,
) -> Path:
    """Write a copy of ``profile_dir``'s profile into ``out_dir`` fit for the local cluster.

    Only two things change, so the profile under test is the real one: each ``# EDIT`` value is
    replaced by ``edit_values[key]`` (or dropped for REMOVE), and top-level ``overrides`` are set.
    Raises KeyError when the profile marks a key `# EDIT` that ``edit_values`` does not cover.
    """
    tree, edit_paths = read_profile(profile_dir)
    for path in sorted(edit_paths):
        leaf = path[-1]
        if leaf not in edit_values:
            raise KeyError(
                f"{Path(profile_dir) / PROFILE_FILE}: `{'.'.join(path)}` is marked {EDIT_MARKER!r} "
                f"but the test harness has no local value for `{leaf}`; add it to LOCAL_EDIT_VALUES"
            )
        container = _lookup(tree, path[:-1])
        if edit_values[leaf] is REMOVE:
            container.pop(leaf, None)  # aliases share the container, so it may be gone already
        else:
            container[leaf] = edit_values[leaf]
    tree.update(overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROFILE_FILE).write_text(
        "# Generated by tests/slurm_cluster.py from profiles/slurm: do not edit.\n"
        + yaml.safe_dump(tree, sort_keys=False)
    )
    return out_dir


test_profile_from.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


# --------------------------------------------------------------------------------------------
# Running Snakemake


def snakemake_command(
    profile_dir: Path,
    targets: Sequence[str],
    extra_args: Sequence[str] = (),
    configfile: Path | None = None,
) -> list[str]:
    """`python -m snakemake` from this venv, so jobs run the same interpreter and plugins.

    Targets come before ``extra_args`` because options like ``--config`` take every word after
    them.
    """
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        str(Path(profile_dir).resolve()),
        "--executor",
        "slurm",
    ]
    if configfile is not None:
        # One word: `--configfile PATH` takes every later non-option word (the targets) as a file too.
        command.append(f"--configfile={Path(configfile).resolve()}")
    return [*command, *targets, *extra_args]


def start_snakemake_on_slurm(
    cluster: LocalSlurmCluster,
    workflow_dir: Path,
    profile_dir: Path,
    targets: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    configfile: Path | None = None,
) -> subprocess.Popen[str]:
    """Start Snakemake in ``workflow_dir`` in the background (for tests that act mid-run)."""
    return subprocess.Popen(
        snakemake_command(profile_dir, targets, extra_args, configfile),
        cwd=workflow_dir,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_snakemake(process: subprocess.Popen[str]) -> str:
    """Interrupt a running Snakemake (its clean shutdown scancels its jobs); return its output."""
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def finish_snakemake(process: subprocess.Popen[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Wait for a started Snakemake; past ``timeout_s`` stop it and raise TimeoutExpired."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        output = stop_snakemake(process)
        raise subprocess.TimeoutExpired(process.args, timeout_s, output=output) from None
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def run_snakemake_on_slurm(
    cluster: LocalSlurmCluster,
    workflow_dir: Path,
    profile_dir: Path,
    targets: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 600,
    configfile: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake in ``workflow_dir`` through SLURM; stdout holds the merged log."""
    process = start_snakemake_on_slurm(cluster, workflow_dir, profile_dir, targets, extra_args, configfile)
    return finish_snakemake(process, timeout)
