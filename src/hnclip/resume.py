"""Resume state that knows where it came from.

A job that can be interrupted (fine-tuning, the demo baseline's training, a VQA chunk) keeps its work in a state
directory outside the rule's declared outputs, so that Snakemake never deletes it when it cleans a failed or
preempted job. Such a directory must only ever be continued by a job that would produce the same result:

- ``job_fingerprint`` records everything that determines the result: the settings the job received, the sha256 of
  each input file (or of every file in an input directory), the digest of this package's source files and the
  torch version;
- ``claim_state_dir`` keeps a state whose fingerprint equals the job's, and otherwise moves it aside to
  ``<state_dir>.stale`` (replacing an older one there, so at most one stale copy per job takes disk), logs what
  differs, and starts an empty state with the job's fingerprint;
- ``release_state_dir`` removes the state of a job that finished, so a forced rerun starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from hnclip.io import write_json
from hnclip.provenance import sha256_file

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
STALE_SUFFIX = ".stale"
# Sources whose content decides what the library computes; model configs are JSON (hnclip-tiny).
SOURCE_SUFFIXES = (".py", ".json")


@lru_cache(maxsize=1)
def source_digest() -> str:
    """The sha256 of this package's source files (names and contents, in sorted order).

    Unlike a git commit it names the code that actually ran, also in a work tree with uncommitted edits, and it
    does not change when only documentation or tests change.
    """
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def input_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist: cannot fingerprint it")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def job_fingerprint(settings: Mapping[str, Any], inputs: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Everything that determines a resumable job's result, as JSON-comparable values."""
    import torch

    return {
        "settings": json.loads(json.dumps(dict(settings), sort_keys=True, default=str)),
        "inputs": {str(path): input_digest(path) for path in inputs},
        "code": source_digest(),
        "torch": torch.__version__,
    }


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (a key missing on one side shows as ``<absent>``)."""
    differences = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            differences += fingerprint_differences(before, after, prefix=f"{name}.")
        elif before != after:
            differences.append(f"{name}: {before!r} -> {after!r}")
    return differences


def claim_state_dir(state_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> bool:
    """Make ``state_dir`` hold only state this job may resume; returns whether an existing state is kept.

    A state with the same fingerprint is kept. Any other (another setting, input or code version, or a state from
    before fingerprints, which has none) is moved to ``<state_dir>.stale`` with a log line naming what differs.
    """
    state_dir = Path(state_dir)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    recorded = _read_fingerprint(state_dir)
    if recorded == fingerprint:
        return True
    if state_dir.exists() and any(state_dir.iterdir()):
        stale = state_dir.with_name(state_dir.name + STALE_SUFFIX)
        reasons = ["it has no fingerprint"] if recorded is None else fingerprint_differences(recorded, fingerprint)
        log.warning("setting aside the state in %s (moved to %s): it was made by another job; %s",
                    state_dir, stale, "; ".join(reasons))
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(state_dir, stale)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(state_dir / FINGERPRINT_FILE, fingerprint)
    return False


def release_state_dir(state_dir: str | os.PathLike) -> None:
    """The job finished and published its outputs: its state must never be resumed again."""
    state_dir = Path(state_dir)
    if state_dir.exists():
        shutil.rmtree(state_dir)
        log.info("removed the finished job's state %s", state_dir)


def _read_fingerprint(state_dir: Path) -> dict | None:
    path = state_dir / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
