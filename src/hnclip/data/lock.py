"""The download lock, ``resources/manifest.lock.yaml``: what the first download of each manifest entry got, so
that every later download, on any machine, gets the same bytes or stops.

The manifest pins what a publisher states (a sha256, a size, a commit). The lock holds the rest, written by the
first download of each entry and committed by the user: for a Hugging Face entry, the commit its ``revision``
resolved to, and for every downloaded file its size and sha256. A later download fetches that commit and checks
every file against the lock; a different file stops it with an error naming the file and both digests. Changing
an entry's ``revision`` in the manifest stops the download too, until the entry is deleted from the lock: a new
revision is new data and should be a decision, not a side effect.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from hnclip.io import write_text

LOCK_VERSION = 1
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class LockError(ValueError):
    """The lock file is malformed, or disagrees with the manifest; the message names the file and entry."""


class RevisionChangedError(LockError):
    """An entry's manifest revision is not the one its lock was made from."""


class PinnedFileMismatchError(LockError):
    """A downloaded file is not the one the lock pins: the message names the file, expected and actual digests."""


@dataclass(frozen=True)
class LockedFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class LockedEntry:
    """What the first download of one entry got. ``revision`` is what the manifest asked for then; ``commit``
    what it resolved to (both None for a plain URL entry)."""

    revision: str | None = None
    commit: str | None = None
    files: Mapping[str, LockedFile] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.revision is not None:
            record["revision"] = self.revision
            record["commit"] = self.commit
        record["files"] = {path: {"size": f.size, "sha256": f.sha256} for path, f in sorted(self.files.items())}
        return record


def lock_path_for(manifest_path: str | os.PathLike) -> Path:
    """``manifest.yaml`` → ``manifest.lock.yaml`` beside it."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(f"{manifest_path.stem}.lock{manifest_path.suffix}")


def is_commit_hash(revision: str) -> bool:
    return COMMIT_HASH.fullmatch(revision) is not None


def read_lock(path: str | os.PathLike) -> dict[str, LockedEntry]:
    """Every locked entry of the lock file at ``path``; a missing file is an empty lock."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LockError(f"lock file {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict) or document.get("version") != LOCK_VERSION:
        raise LockError(f"lock file {path} must be a mapping with 'version: {LOCK_VERSION}'")
    entries = document.get("entries") or {}
    if not isinstance(entries, dict):
        raise LockError(f"lock file {path}: 'entries' must be a mapping")
    return {name: _locked_entry(path, name, raw) for name, raw in entries.items()}


def _locked_entry(path: Path, name: str, raw: Any) -> LockedEntry:
    def problem(what: str) -> LockError:
        return LockError(f"lock file {path}, entry {name!r}: {what}")

    if not isinstance(raw, dict):
        raise problem("must be a mapping")
    revision, commit = raw.get("revision"), raw.get("commit")
    if revision is not None and (not isinstance(commit, str) or not is_commit_hash(commit)):
        raise problem(f"commit must be a 40-digit hex commit hash, got {commit!r}")
    files = {}
    for rel, pin in (raw.get("files") or {}).items():
        if not isinstance(pin, dict) or not isinstance(pin.get("size"), int) or not SHA256_HEX.fullmatch(
            str(pin.get("sha256", ""))
        ):
            raise problem(f"files[{rel!r}] must have an integer size and a 64-digit hex sha256, got {pin!r}")
        files[rel] = LockedFile(pin["size"], pin["sha256"])
    return LockedEntry(revision, commit, files)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Parallel download jobs add their entries one at a time (an flock on a file beside the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.flock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_entry(path: str | os.PathLike, name: str, entry: LockedEntry) -> None:
    """Add or extend entry ``name`` in the lock file: files already locked keep their pins."""
    path = Path(path)
    with _exclusive(path):
        entries = read_lock(path)
        previous = entries.get(name)
        if previous is not None:
            entry = LockedEntry(entry.revision, entry.commit, {**entry.files, **previous.files})
        entries[name] = entry
        header = (
            "# Written by the first download of each entry (hnclip.data.lock); commit it. Every later download\n"
            "# fetches the locked commit and checks every file's size and sha256 against this file.\n"
        )
        body = {"version": LOCK_VERSION, "entries": {n: e.to_dict() for n, e in sorted(entries.items())}}
        write_text(path, header + yaml.safe_dump(body, sort_keys=False, width=120))


def pinned_commit(name: str, revision: str, locked: LockedEntry | None, lock_path: Path) -> str | None:
    """The commit to fetch for an entry asking for ``revision``: the locked one, a commit hash as it is, or None
    (a branch or tag never fetched: resolve it now). A revision other than the locked one stops here."""
    if locked is not None and locked.revision is not None:
        if locked.revision != revision:
            raise RevisionChangedError(
                f"manifest entry {name!r} now asks for revision {revision!r}, but {lock_path} pins revision "
                f"{locked.revision!r} (commit {locked.commit}) from its first download. A new revision is new "
                f"data: to take it, delete entry {name!r} from {lock_path.name} and its downloaded files, then "
                "fetch again"
            )
        return locked.commit
    return revision if is_commit_hash(revision) else None


def expected_file(
    name: str, rel: str, *, sha256: str | None, size: int | None, locked: LockedEntry | None, lock_path: Path
) -> tuple[str | None, int | None]:
    """The sha256 and size a downloaded file must have: the manifest's, else the lock's (None: not yet locked)."""
    pin = locked.files.get(rel) if locked is not None else None
    if pin is None:
        return sha256, size
    if sha256 is not None and sha256 != pin.sha256 or size is not None and size != pin.size:
        raise LockError(
            f"manifest entry {name!r}: file {rel} is pinned to sha256 {sha256} ({size} bytes) in the manifest but "
            f"{pin.sha256} ({pin.size} bytes) in {lock_path}; fix one of them"
        )
    return pin.sha256, pin.size


def check_pinned_file(name: str, path: Path, rel: str, actual: LockedFile, locked: LockedEntry | None,
                      lock_path: Path) -> None:
    """Stop when a file on disk is not the one the lock pins."""
    pin = locked.files.get(rel) if locked is not None else None
    if pin is not None and pin != actual:
        raise PinnedFileMismatchError(
            f"manifest entry {name!r}: {path} is not the file {lock_path} pins: expected sha256 {pin.sha256} "
            f"({pin.size} bytes), got {actual.sha256} ({actual.size} bytes)"
        )


def pinned_inputs(manifest_path: str | os.PathLike) -> dict[str, str]:
    """Per manifest entry, what pins it now: ``commit <hash>`` for a Hugging Face entry, ``sha256 <digest>`` for a
    file, ``not pinned yet`` before its first download (result provenance records this)."""
    from hnclip.data.manifest import load_manifest  # the manifest reader sits a layer above the lock

    manifest_path = Path(manifest_path)
    locked = read_lock(lock_path_for(manifest_path))
    pins = {}
    for name, entry in load_manifest(manifest_path).items():
        hf = entry.hf or entry.hf_snapshot
        lock = locked.get(name)
        if hf is not None:
            commit = hf.revision if is_commit_hash(hf.revision) else (lock.commit if lock else None)
            pins[name] = f"commit {commit}" if commit else "not pinned yet"
        elif entry.sha256 or (lock and entry.file in lock.files):
            pins[name] = f"sha256 {entry.sha256 or lock.files[entry.file].sha256}"
        elif entry.md5:
            pins[name] = f"md5 {entry.md5}"
        else:
            pins[name] = "not pinned yet" if entry.source != "manual" else "manual"
    return pins
