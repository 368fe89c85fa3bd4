"""A warm interpreter for many short local jobs: import torch & co once, fork a child per Snakemake job.

On 2 cores, importing torch, open_clip and transformers costs ~8 s per job, more than many demo jobs compute. Under
``python -m hnclip.pipeline.warm run -- <command>`` a server imports them once and listens on a Unix socket named in
``HNCLIP_WARM_SOCKET``. Each job's adapter (:func:`hnclip.pipeline.workflow.run_logged`) then hands its script to the
server, which forks a child that already has everything imported. The child runs the very same script file with the
job's working directory, environment and standard streams (passed over the socket), so logs, outputs and exit
codes are those of a normal run; the adapter waits for it and forwards SIGTERM/SIGINT/SIGUSR1 to it.

Without the variable, or when the server does not answer, jobs run in their own process as usual (SLURM jobs,
``snakemake`` run by hand). Snakemake's ``benchmark:`` files then time the job correctly but count the adapter's
memory, not the child's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pickle
import runpy
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SOCKET_VARIABLE = "HNCLIP_WARM_SOCKET"
# The server's interpreter: a job running another one (a conda environment Snakemake deployed with --sdm conda)
# runs in its own process, since a child of the server would run the server's packages instead of the job's.
PREFIX_VARIABLE = "HNCLIP_WARM_PREFIX"
CHILD_VARIABLE = "HNCLIP_WARM_CHILD"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What the pipeline's jobs import; a module that fails to import is skipped (the job then imports it itself).
PRELOAD = (
    "torch",
    "open_clip",
    "transformers",
    "pandas",
    "pyarrow.parquet",
    "matplotlib.pyplot",
    "hnclip.train",
    "hnclip.evaluate.run",
    "hnclip.llava.stage",
    "hnclip.llava.infer",
    "hnclip.llava.score",
    "hnclip.report.stage",
    "hnclip.synth",
    "hnclip.data.hnc",
    "hnclip.data.vqa",
)
_HEADER = struct.Struct("!I")
log = logging.getLogger(__name__)


# ---- messages: a 4-byte length, then a pickle ------------------------------------------------------------------
def _send(sock: socket.socket, message, fds: list[int] | None = None) -> None:
    payload = pickle.dumps(message)
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _receive_exactly(sock: socket.socket, size: int, first: bytes = b"") -> bytes:
    data = first
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return data


def _receive(sock: socket.socket, with_fds: int = 0):
    """One message (and up to ``with_fds`` file descriptors sent with its first bytes)."""
    fds: list[int] = []
    if with_fds:
        first, fds, _, _ = socket.recv_fds(sock, 65536, with_fds)
        if not first:
            raise ConnectionError("the other side closed the connection")
    else:
        first = b""
    head = _receive_exactly(sock, _HEADER.size, first[: _HEADER.size])
    (size,) = _HEADER.unpack(head)
    body = _receive_exactly(sock, size, first[_HEADER.size :])
    return pickle.loads(body), fds


# ---- the job side ------------------------------------------------------------------------------------------------
def in_child() -> bool:
    return os.environ.get(CHILD_VARIABLE) == "1"


def delegate(script: str) -> int | None:
    """Run ``script`` in a forked child of the warm server; its exit code, or None when no server answers."""
    path = os.environ.get(SOCKET_VARIABLE)
    if not path or in_child():
        return None
    server_prefix = os.environ.get(PREFIX_VARIABLE)
    if server_prefix is not None and os.path.realpath(server_prefix) != os.path.realpath(sys.prefix):
        print(f"hnclip.pipeline.warm: this job runs in {sys.prefix}, the warm server in {server_prefix}: running it in its "
              "own process", file=sys.stderr, flush=True)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        sys.stdout.flush()
        sys.stderr.flush()
        request = {"script": os.path.abspath(script), "cwd": os.getcwd(), "env": dict(os.environ),
                   "argv": list(sys.argv)}
        _send(sock, request, fds=[0, 1, 2])
        (child_pid, _) = _receive(sock)
        previous = {s: signal.signal(s, lambda number, _frame: _forward(child_pid, number)) for s in FORWARDED_SIGNALS}
        try:
            (exit_code, _) = _receive(sock)
        except ConnectionError:
            exit_code = 1  # the child died without reporting (killed): a failed job
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    return int(exit_code)


def _forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


# ---- the server side ---------------------------------------------------------------------------------------------
def preload(modules=PRELOAD) -> list[str]:
    """Import what jobs will need; returns the modules that failed (jobs import those themselves)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a missing optional stack must not stop the server
            log.warning("warm server: cannot preload %s (%s)", name, error)
            failed.append(name)
    return failed


def serve(path: str | os.PathLike, modules=PRELOAD) -> None:
    """Preload, then fork a child per connection until SIGTERM. The socket appears only once preloading is done."""
    preload(modules)
    path = str(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = path + ".binding"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    server.bind(partial)
    server.listen(64)
    os.replace(partial, path)  # clients never see a socket that does not accept yet
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGCHLD, lambda *_: _reap_children())
    server.settimeout(0.5)
    try:
        while not stopping:
            try:
                connection, _ = server.accept()
            except (TimeoutError, socket.timeout, InterruptedError):
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                server.close()
                _run_child(connection)  # never returns
            connection.close()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _run_child(connection: socket.socket) -> None:
    exit_code = 1
    try:
        for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        request, fds = _receive(connection, with_fds=3)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_VARIABLE] = "1"
        sys.argv = request["argv"]
        _send(connection, os.getpid())
        exit_code = _run_script(request["script"])
    except BaseException:  # noqa: BLE001 - whatever happens, the job side must hear an exit code
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            _send(connection, exit_code)
        os._exit(exit_code)


def _run_script(script: str) -> int:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


# ---- the wrapper: server around one command ----------------------------------------------------------------------
def run_with_server(command: list[str], modules=PRELOAD, startup_timeout: float = 120.0) -> int:
    """Run ``command`` with a warm server beside it; the server stops when the command ends."""
    with tempfile.TemporaryDirectory(prefix="hnclip-warm-") as tmp:
        path = str(Path(tmp) / "server.sock")
        server = subprocess.Popen(
            [sys.executable, "-m", "hnclip.pipeline.warm", "serve", "--socket", path, "--preload", ",".join(modules)]
        )
        try:
            _wait_for_socket(path, server, startup_timeout)
            return subprocess.call(command, env={**os.environ, SOCKET_VARIABLE: path, PREFIX_VARIABLE: sys.prefix})
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_for_socket(path: str, server: subprocess.Popen, timeout: float) -> None:
    """Jobs would run cold while the server preloads; waiting costs less than that (imports are the same)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if server.poll() is not None:
            raise RuntimeError(f"the warm server exited with code {server.returncode} before listening on {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm server did not listen on {path} within {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnclip.pipeline.warm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="verb", required=True)
    serve_parser = commands.add_parser("serve", help="preload, then serve jobs on a Unix socket until SIGTERM")
    serve_parser.add_argument("--socket", required=True)
    serve_parser.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules to import")
    run_parser = commands.add_parser("run", help="run a command (after --) with a warm server beside it")
    run_parser.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules to import")
    run_parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modules = tuple(name for name in args.preload.split(",") if name)
    if args.verb == "serve":
        serve(args.socket, modules)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: give the command after --")
    return run_with_server(command, modules)


if __name__ == "__main__":
    sys.exit(main())
