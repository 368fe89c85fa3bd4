"""Provenance: what produced a result (config, code, versions, seed, inputs), attached to every result file."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

TRACKED_PACKAGES = (
    "hnclip", "torch", "torchvision", "open_clip_torch", "transformers", "tokenizers",
    "snakemake", "pandas", "pyarrow", "numpy", "pillow",
)


def config_hash(config: dict) -> str:
    """A stable short hash of a config dict (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the code that ran, with ``+dirty`` when the work tree had changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@lru_cache(maxsize=1)
def _pinned_inputs() -> dict[str, str]:
    """What pins each downloaded input (commit or sha256), from the manifest and its lock."""
    from hnclip.data.lock import pinned_inputs

    return pinned_inputs(Path(__file__).resolve().parents[2] / "resources" / "manifest.yaml")


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(
    config: dict | None = None,
    *,
    seed: int | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    checksum_inputs: bool = False,
    input_digests: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance block stored under ``"provenance"`` in every result file.

    ``inputs`` are listed by path; with ``checksum_inputs`` each file's sha256 is recorded too
    (for small inputs: shards, checkpoints; not the 20 GB image archive). ``input_digests`` ({path: sha256}, as a
    job's resume fingerprint already holds them) is recorded as it is, instead of reading the files again.
    """
    record: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "host": platform.node(),
    }
    if config is not None:
        record["config_hash"] = config_hash(config)
        if config.get("data_source") == "download":
            record["pinned_inputs"] = _pinned_inputs()
    if seed is not None:
        record["seed"] = seed
    input_list = [str(p) for p in inputs]
    if input_digests is not None:
        record["inputs"] = dict(input_digests)
    elif input_list:
        record["inputs"] = (
            {p: sha256_file(p) for p in input_list if Path(p).is_file()} if checksum_inputs else input_list
        )
    record.update(extra)
    return record
