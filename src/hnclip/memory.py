"""Peak memory of a job's whole process tree (the job and its loader workers), sampled from /proc.

Snakemake's ``benchmark:`` samples every 30 s once a job has run 15 s, so it misses the peak of a long job; a cluster
job's memory limit counts every process of the job. Every rule adapter therefore samples its own process tree every
``SAMPLE_INTERVAL_S`` and writes the peak into the rule's log (``hnclip.pipeline.workflow.run_logged``); the scale rehearsal
reads it back from there.

Pss (proportional set size) splits a page shared by several processes between them: summed over a tree it is the
memory the tree really holds, where summed RSS would count a forked worker's copy-on-write pages once per process.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL_S = 0.2
PEAK_LINE = "peak memory of the job's process tree"
_PEAK_PATTERN = re.compile(PEAK_LINE + r": Pss (?P<pss>[0-9.]+) MB \(anonymous (?P<anon>[0-9.]+) MB\), "
                           r"(?P<processes>[0-9]+) process")


# The same for processes started with these in their environment (glibc reads them at start-up).
BOUNDED_HEAP_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# glibc's mallopt parameters: the size from which an allocation is its own mmap, and the free space at the heap's top
# that is given back to the system.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
BOUNDED_HEAP_THRESHOLD = 128 * 1024


def bound_heap_growth() -> bool:
    """Give every freed allocation of 128 kB or more back to the system at once (glibc; elsewhere a no-op).

    By default glibc raises its mmap threshold after the first large free, up to 32 MB: from then on each decoded
    image (a 1.35 MB tensor at 336 px) comes from the heap, which fragments and is not given back. A loader worker
    decoding 300 more GQA-size images held 260 MB more at its peak; with the threshold fixed, 4 MB
    (tests/workflow/test_rehearsal_scale.py). Setting a threshold also turns the adjustment off. Every loader worker
    calls it (``hnclip.loader``). Not the job's own process: there every freed activation of a model run on the CPU
    would be unmapped and mapped again, which made the demo's CPU training 2.2 times slower; on a GPU node that
    process keeps no images and no activations on the host.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, BOUNDED_HEAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, BOUNDED_HEAP_THRESHOLD))


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (loader workers, their helpers), from /proc/<pid>/task/<tid>/children."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:  # ended meanwhile
            continue
        for thread in threads:
            try:
                todo.extend(int(child) for child in Path(f"/proc/{pid}/task/{thread}/children").read_text().split())
            except OSError:
                pass
    return tree


def _fields_kb(path: str, names: tuple[str, ...]) -> dict[str, int]:
    values = dict.fromkeys(names, 0)
    try:
        for line in Path(path).read_text().splitlines():
            name = line.split(":", 1)[0]
            if name in values:
                values[name] = int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return values


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a process tree in MB: summed Pss, Pss of anonymous and shared-memory pages, summed RssAnon."""

    pss_mb: float
    anon_pss_mb: float
    rss_anon_mb: float
    processes: int


def tree_memory(root: int) -> TreeMemory:
    pids = process_tree(root)
    pss = anon = rss_anon = 0
    for pid in pids:
        rollup = _fields_kb(f"/proc/{pid}/smaps_rollup", ("Pss", "Pss_Anon", "Pss_Shmem"))
        pss += rollup["Pss"]
        anon += rollup["Pss_Anon"] + rollup["Pss_Shmem"]  # loader batches travel through shared memory
        rss_anon += _fields_kb(f"/proc/{pid}/status", ("RssAnon",))["RssAnon"]
    return TreeMemory(pss * 1024 / 1e6, anon * 1024 / 1e6, rss_anon * 1024 / 1e6, len(pids))


class PeakMemory:
    """Samples ``root``'s process tree in a daemon thread until stopped; ``peak`` holds the largest of each field."""

    def __init__(self, root: int | None = None, interval_s: float = SAMPLE_INTERVAL_S):
        self.root, self.interval_s = root or os.getpid(), interval_s
        self.peak = TreeMemory(0.0, 0.0, 0.0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        now, peak = tree_memory(self.root), self.peak
        self.peak = TreeMemory(max(peak.pss_mb, now.pss_mb), max(peak.anon_pss_mb, now.anon_pss_mb),
                               max(peak.rss_anon_mb, now.rss_anon_mb), max(peak.processes, now.processes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> str:
        p = self.peak
        return (f"{PEAK_LINE}: Pss {p.pss_mb:.0f} MB (anonymous {p.anon_pss_mb:.0f} MB), {p.processes} process(es), "
                f"sampled every {self.interval_s:g} s")


def peak_from_log(path: str | os.PathLike) -> TreeMemory | None:
    """The last peak a rule's log records (a log gathers every attempt of its job), or None."""
    matches = list(_PEAK_PATTERN.finditer(Path(path).read_text(errors="replace")))
    if not matches:
        return None
    last = matches[-1]
    return TreeMemory(float(last["pss"]), float(last["anon"]), 0.0, int(last["processes"]))
