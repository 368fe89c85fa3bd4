"""What every rule adapter in workflow_scripts/ shares: log to the rule's log file, then call one function.

Adapters import the library inside ``main``: the adapter process then stays light enough to hand the job to a warm
server (:mod:`hnclip.pipeline.warm`), where those imports are already done.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from typing import Any, Callable

from hnclip.pipeline import warm
from hnclip.memory import PeakMemory


def configure_logging() -> None:
    """Send logging records to stderr, which run_logged points at the rule's log (tqdm writes there too)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr)],
        force=True,
    )


def run_logged(snakemake: Any, main: Callable[[Any], None]) -> None:
    """Run ``main(snakemake)`` with stderr and logging redirected to ``snakemake.log[0]``.

    Errors are written to the log with their traceback and re-raised so Snakemake marks the job failed. Under a
    warm server (:mod:`hnclip.pipeline.warm`) the script runs in a forked child of it instead, with this process's streams,
    and this process exits with the child's code.
    """
    exit_code = warm.delegate(main.__code__.co_filename)
    if exit_code is not None:
        if exit_code:
            sys.exit(exit_code)
        return
    log_path = snakemake.log[0] if len(snakemake.log) else None
    threads = int(getattr(snakemake, "threads", 1) or 1)
    _limit_torch_threads(threads)
    log_file = open(log_path, "a", buffering=1) if log_path else contextlib.nullcontext(sys.stderr)
    with log_file as stream, contextlib.redirect_stderr(stream):
        configure_logging()
        where = "a child of the warm server" if warm.in_child() else "its own process"
        logging.getLogger("hnclip").info("rule %s, threads %d, in %s", snakemake.rule, threads, where)
        peak = PeakMemory()
        try:
            with peak:
                main(snakemake)
        except BaseException:
            traceback.print_exc(file=stream)
            raise
        finally:
            logging.getLogger("hnclip").info(peak.summary())


def _limit_torch_threads(threads: int) -> None:
    """A job uses the cores Snakemake gave it, no more (several jobs share a node)."""
    try:
        import torch
    except ImportError:  # the data stage's environment has no torch
        return
    torch.set_num_threads(threads)
