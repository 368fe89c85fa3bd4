"""The warm server: a job handed to it runs in a forked child with the job's cwd, environment, streams and exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hnclip.pipeline import warm

JOB = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from types import SimpleNamespace
    from hnclip.pipeline.workflow import run_logged

    def main(smk):
        print("to stdout", flush=True)
        record = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "marker": os.environ.get("MARKER"),
                  "child": os.environ.get("HNCLIP_WARM_CHILD")}
        open("record.json", "w").write(json.dumps(record))
        if os.environ.get("WAIT_FOR_TERM"):
            signal.signal(signal.SIGTERM, lambda *_: (open("got_term", "w").close(), sys.exit(143)))
            open("waiting", "w").close()
            time.sleep(60)
        if os.environ.get("FAIL"):
            raise ValueError("the job failed on purpose")

    run_logged(SimpleNamespace(log=["job.log"], threads=1, rule="job"), main)
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("warm") / "s.sock")
    process = subprocess.Popen([sys.executable, "-m", "hnclip.pipeline.warm", "serve", "--socket", path, "--preload", "json"])
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert process.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.05)
    yield process, path
    process.terminate()
    process.wait(timeout=10)
    assert not os.path.exists(path), "the server leaves its socket behind"


def run_job(tmp_path: Path, socket_path: str | None, **env) -> subprocess.CompletedProcess:
    (tmp_path / "job.py").write_text(JOB)
    environment = {k: v for k, v in os.environ.items() if k != warm.SOCKET_VARIABLE}
    if socket_path:
        environment[warm.SOCKET_VARIABLE] = socket_path
    environment.update(env)
    return subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=60)


def read_record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "record.json").read_text())


def test_job_runs_in_a_child_of_the_server_with_its_cwd_env_and_streams(server, tmp_path):
    process, path = server
    result = run_job(tmp_path, path, MARKER="m-123")
    assert result.returncode == 0, result.stderr
    record = read_record(tmp_path)
    assert record["ppid"] == process.pid
    assert record["cwd"] == str(tmp_path)
    assert record["marker"] == "m-123"
    assert record["child"] == "1"
    assert "to stdout" in result.stdout
    assert "rule job" in (tmp_path / "job.log").read_text()


def test_failure_reaches_the_job_exit_code_and_the_log(server, tmp_path):
    _, path = server
    result = run_job(tmp_path, path, FAIL="1")
    assert result.returncode == 1
    assert "ValueError: the job failed on purpose" in (tmp_path / "job.log").read_text()


def test_without_a_server_the_job_runs_in_its_own_process(tmp_path):
    result = run_job(tmp_path, str(tmp_path / "absent.sock"), MARKER="cold")
    assert result.returncode == 0, result.stderr
    record = read_record(tmp_path)
    assert record["child"] is None
    assert record["marker"] == "cold"


def test_sigterm_to_the_job_reaches_the_child(server, tmp_path):
    """SLURM's warning signal must reach the training loop, which checkpoints on it."""
    _, path = server
    (tmp_path / "job.py").write_text(JOB)
    environment = {**os.environ, warm.SOCKET_VARIABLE: path, "WAIT_FOR_TERM": "1"}
    job = subprocess.Popen([sys.executable, "job.py"], cwd=tmp_path, env=environment)
    deadline = time.monotonic() + 30
    while not (tmp_path / "waiting").exists():
        assert time.monotonic() < deadline and job.poll() is None, "the job never started waiting"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == 143
    assert (tmp_path / "got_term").exists()


def test_run_wrapper_serves_the_command_and_stops_the_server(tmp_path, monkeypatch):
    (tmp_path / "job.py").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(warm.SOCKET_VARIABLE, raising=False)
    assert warm.run_with_server([sys.executable, "job.py"], modules=("json",)) == 0
    assert read_record(tmp_path)["child"] == "1"
    assert not list(Path(tmp_path).glob("*.sock"))


def test_a_job_in_another_interpreter_runs_in_its_own_process(server, tmp_path):
    """A conda-deployed job (--sdm conda) must run its own environment's packages, not the server's."""
    _, path = server
    result = run_job(tmp_path, path, **{warm.PREFIX_VARIABLE: str(tmp_path / "conda-env")})
    assert result.returncode == 0, result.stderr
    assert read_record(tmp_path)["child"] is None
    assert "running it in its own process" in result.stderr
    same = run_job(tmp_path, path, **{warm.PREFIX_VARIABLE: sys.prefix})
    assert same.returncode == 0 and read_record(tmp_path)["child"] == "1"
