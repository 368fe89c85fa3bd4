"""The download manifest, ``resources/manifest.yaml``: one entry per thing to fetch (a URL, a Hugging Face file or
snapshot, or a manual download), with its size, checksums, archive type and outputs.

:func:`load_manifest` reads and checks it; :func:`fetch_manifest_entry` fetches one entry through
:mod:`hnclip.data.download` and :mod:`hnclip.data.archive`, doing nothing when its outputs are already there
and verify.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from hnclip.data.archive import extraction_marker_path, safe_extract, tree_listing, verify_extraction
from hnclip.data.download import (
    ChecksumMismatchError,
    SizeMismatchError,
    download,
    hash_file,
    normalise_digest,
    read_sidecar,
    require_http_url,
    response_headers,
    sidecar_path,
)
from hnclip.data.lock import (
    LockedEntry,
    LockedFile,
    PinnedFileMismatchError,
    check_pinned_file,
    expected_file,
    lock_path_for,
    pinned_commit,
    read_lock,
    record_entry,
)
from hnclip.io import write_json

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """The download manifest is malformed; the message names the file, the entry and the key."""


class MissingOutputError(RuntimeError):
    """A fetched entry did not produce the files its manifest entry promises."""


class ManualDownloadRequired(RuntimeError):
    """The entry cannot be fetched automatically and its outputs are not there yet."""

ARCHIVE_KINDS = ("zip", "tar", "tar.gz", "none")
SOURCE_KEYS = ("url", "hf", "hf_snapshot", "manual")
_COMMON_KEYS = {"description", "notes", "produces"}
_FILE_KEYS = {"file", "size", "sha256", "md5", "archive", "extract_to", "keep_archive"}
_ALLOWED_KEYS = {
    "url": _COMMON_KEYS | _FILE_KEYS | {"url"},
    "hf": _COMMON_KEYS | _FILE_KEYS | {"hf"},
    "hf_snapshot": _COMMON_KEYS | {"hf_snapshot", "local_dir", "files_sha256"},
    "manual": _COMMON_KEYS | {"manual"},
}
SNAPSHOT_MARKER = ".snapshot.json"


@dataclass(frozen=True)
class HFFile:
    """One file of a Hugging Face Hub repository."""

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str = "main"


@dataclass(frozen=True)
class HFSnapshot:
    """A whole Hugging Face Hub repository (or the files matching ``allow_patterns``)."""

    repo_id: str
    repo_type: str = "model"
    revision: str = "main"
    allow_patterns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ManifestEntry:
    """One thing to fetch; paths are relative to the resources folder."""

    name: str
    source: str  # one of SOURCE_KEYS
    produces: tuple[str, ...]
    description: str = ""
    notes: str = ""
    url: str | None = None
    hf: HFFile | None = None
    hf_snapshot: HFSnapshot | None = None
    manual: str | None = None
    file: str | None = None
    local_dir: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    archive: str = "none"
    extract_to: str | None = None
    keep_archive: bool = True
    files_sha256: Mapping[str, str] | None = None  # hf_snapshot: sha256 of files the publisher states


def _as_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _as_relative_path(value: Any) -> str:
    text = _as_string(value)
    if os.path.isabs(text) or ".." in Path(text).parts:
        raise ValueError(f"must be a path relative to the resources folder without '..', got {value!r}")
    return os.path.normpath(text)


def _as_sha256_map(value: Any) -> dict[str, str]:
    """``{path inside the snapshot: sha256}``."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"must map file names to sha256 digests, got {value!r}")
    return {_as_relative_path(rel): normalise_digest(digest, "sha256") for rel, digest in value.items()}


def _as_optional_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive integer (bytes) or null, got {value!r}")
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _as_archive_kind(value: Any) -> str:
    if value not in ARCHIVE_KINDS:
        raise ValueError(f"must be one of {ARCHIVE_KINDS}, got {value!r}")
    return value


def _as_produces(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of relative paths, got {value!r}")
    return tuple(_as_relative_path(item) for item in value)


def _as_repo_fields(value: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with keys {sorted(required | optional)}, got {value!r}")
    unknown = set(value) - required - optional
    missing = required - set(value)
    if unknown or missing:
        raise ValueError(f"unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
    fields = {key: _as_string(value[key]) for key in value if key != "allow_patterns"}
    if fields.get("repo_type", "model") not in ("model", "dataset", "space"):
        raise ValueError(f"repo_type must be model, dataset or space, got {fields['repo_type']!r}")
    return fields


def _as_hf_file(value: Any) -> HFFile:
    return HFFile(**_as_repo_fields(value, {"repo_id", "filename"}, {"repo_type", "revision"}))


def _as_hf_snapshot(value: Any) -> HFSnapshot:
    fields = _as_repo_fields(value, {"repo_id"}, {"repo_type", "revision", "allow_patterns"})
    patterns = value.get("allow_patterns")
    if patterns is not None:
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"allow_patterns must be a list of glob strings, got {patterns!r}")
        patterns = tuple(patterns)
    return HFSnapshot(**fields, allow_patterns=patterns)


class _EntryReader:
    """Reads one raw manifest entry, turning every problem into a ManifestError naming entry and key."""

    def __init__(self, manifest_path: Path, name: str, raw: Any) -> None:
        self.manifest_path, self.name = manifest_path, name
        if not isinstance(raw, dict):
            raise self.error(None, f"must be a mapping, got {type(raw).__name__}")
        self.raw = raw

    def error(self, key: str | None, message: str) -> ManifestError:
        where = f"entry {self.name!r}" + (f", key {key!r}" if key else "")
        return ManifestError(f"{self.manifest_path}: {where}: {message}")

    def get(self, key: str, convert: Callable[[Any], Any], *, required: bool = False, default: Any = None) -> Any:
        if key not in self.raw:
            if required:
                raise self.error(key, "is required")
            return default
        try:
            return convert(self.raw[key])
        except ValueError as problem:
            raise self.error(key, str(problem)) from None

    def source(self) -> str:
        sources = [key for key in SOURCE_KEYS if key in self.raw]
        if len(sources) != 1:
            raise self.error(None, f"needs exactly one source key of {SOURCE_KEYS}, found {sources}")
        unknown = sorted(set(self.raw) - _ALLOWED_KEYS[sources[0]])
        if unknown:
            raise self.error(unknown[0], f"is not allowed for a {sources[0]!r} entry "
                                         f"(allowed: {sorted(_ALLOWED_KEYS[sources[0]])})")
        return sources[0]


def _read_file_fields(reader: _EntryReader) -> dict[str, Any]:
    """The fields of a downloaded-file entry (url or hf source)."""
    fields = {
        "file": reader.get("file", _as_relative_path, required=True),
        "size": reader.get("size", _as_optional_size, required=True),
        "sha256": reader.get("sha256", lambda v: normalise_digest(v, "sha256"), required=True),
        "md5": reader.get("md5", lambda v: normalise_digest(v, "md5")),
        "archive": reader.get("archive", _as_archive_kind, required=True),
        "keep_archive": reader.get("keep_archive", _as_bool, default=True),
    }
    if fields["archive"] == "none":
        for key in ("extract_to", "keep_archive"):
            if key in reader.raw:
                raise reader.error(key, "only applies to archives (archive is 'none')")
    else:
        fields["extract_to"] = reader.get("extract_to", _as_relative_path, required=True)
    return fields


def _check_produces_location(reader: _EntryReader, entry: ManifestEntry) -> None:
    """Catch typos early: outputs must lie where the entry actually writes."""
    if entry.source == "manual":
        return
    if entry.source == "hf_snapshot":
        root = entry.local_dir
    elif entry.archive == "none":
        if entry.file not in entry.produces:
            raise reader.error("produces", f"must list the downloaded file {entry.file!r}")
        return
    else:
        root = entry.extract_to
    outside = [p for p in entry.produces if not (p == root or p.startswith(root.rstrip("/") + "/"))]
    if outside:
        raise reader.error("produces", f"{outside} are not under {root!r}")


def _read_entry(manifest_path: Path, name: str, raw: Any) -> ManifestEntry:
    reader = _EntryReader(manifest_path, name, raw)
    source = reader.source()
    fields: dict[str, Any] = {
        "name": name,
        "source": source,
        "produces": reader.get("produces", _as_produces, required=True),
        "description": reader.get("description", _as_string, default=""),
        "notes": reader.get("notes", _as_string, default=""),
    }
    if source == "url":
        fields["url"] = reader.get("url", _as_string, required=True)
        try:
            require_http_url(fields["url"])
        except ValueError as problem:
            raise reader.error("url", str(problem)) from None
    elif source == "hf":
        fields["hf"] = reader.get("hf", _as_hf_file, required=True)
    elif source == "hf_snapshot":
        fields["hf_snapshot"] = reader.get("hf_snapshot", _as_hf_snapshot, required=True)
        fields["local_dir"] = reader.get("local_dir", _as_relative_path, required=True)
        fields["files_sha256"] = reader.get("files_sha256", _as_sha256_map, default=None)
    else:
        fields["manual"] = reader.get("manual", _as_string, required=True)
    if source in ("url", "hf"):
        fields.update(_read_file_fields(reader))
    entry = ManifestEntry(**fields)
    _check_produces_location(reader, entry)
    return entry


def load_manifest(path: str | os.PathLike) -> dict[str, ManifestEntry]:
    """Read and validate a download manifest: ``{"version": 1, "entries": {name: entry}}``.

    Every problem raises :class:`ManifestError` naming the file, the entry and the key.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ManifestError(f"manifest {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(document.get("entries"), dict):
        raise ManifestError(f"manifest {path} must be a mapping with 'version: 1' and an 'entries' mapping")
    entries = {}
    for name, raw in document["entries"].items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
            raise ManifestError(f"{path}: entry name {name!r} must be lower-case letters, digits and '_'")
        entries[name] = _read_entry(path, name, raw)
    return entries


# --------------------------------------------------------------------------------- fetching entries
def fetch_record_path(name: str, resources_dir: str | os.PathLike) -> Path:
    """The record :func:`fetch_manifest_entry` writes when entry ``name`` is in place (a rule's output)."""
    return Path(resources_dir) / ".fetched" / f"{name}.json"


def hf_file_url(hf: HFFile) -> str:
    """The resolve URL of a Hub file; honours ``HF_ENDPOINT`` as set now (tests point it at loopback)."""
    import huggingface_hub  # imported here: only HF entries need it

    return huggingface_hub.hf_hub_url(
        hf.repo_id, hf.filename, repo_type=hf.repo_type, revision=hf.revision, endpoint=_hf_endpoint()
    )


def _hf_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def entry_url(entry: ManifestEntry) -> str:
    """The URL a url/hf entry downloads from."""
    if entry.hf is not None:
        return hf_file_url(entry.hf)
    if entry.url is None:
        raise ValueError(f"manifest entry {entry.name!r} ({entry.source}) has no single download URL")
    return entry.url


def _missing_outputs(outputs: Iterable[Path]) -> list[Path]:
    """Outputs that are absent; an empty folder counts as absent (an interrupted copy, not data)."""
    return [p for p in outputs if not p.exists() or (p.is_dir() and not any(p.iterdir()))]


@dataclass(frozen=True)
class _Pins:
    """The lock file and what it holds for the entry being fetched."""

    path: Path
    locked: LockedEntry | None


def fetch_manifest_entry(
    name: str,
    manifest_path: str | os.PathLike,
    resources_dir: str | os.PathLike,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60,
    rehash: bool = False,
) -> list[Path]:
    """Download, verify and extract manifest entry ``name`` under ``resources_dir``; return its outputs.

    Nothing is downloaded when the outputs already exist and verify: a plain file against its size and
    checksums (sidecar), an extracted archive against its extraction marker (outputs placed there by
    hand, without a marker, are taken as they are). A download fetches the commit and checks the files
    the lock (:mod:`hnclip.data.lock`) pins, and pins what it fetched when the lock did not hold the entry yet.
    Writes :func:`fetch_record_path` at the end.
    """
    entry = _entry_named(load_manifest(manifest_path), name, manifest_path)
    resources_dir = Path(resources_dir)
    outputs = [resources_dir / rel for rel in entry.produces]
    lock_path = lock_path_for(manifest_path)
    pins = _Pins(lock_path, read_lock(lock_path).get(name))
    if entry.source == "manual":
        _fetch_manual(entry, resources_dir, outputs, pins)
    elif entry.source == "hf_snapshot":
        _fetch_snapshot(entry, resources_dir, outputs, pins)
    else:
        _fetch_file(entry, resources_dir, outputs, pins, retries=retries, backoff=backoff, timeout=timeout,
                    rehash=rehash)
    _write_fetch_record(entry, resources_dir, outputs)
    return outputs


def _entry_named(entries: dict[str, ManifestEntry], name: str, manifest_path: str | os.PathLike) -> ManifestEntry:
    if name not in entries:
        raise ManifestError(f"{manifest_path} has no entry {name!r} (entries: {', '.join(entries)})")
    return entries[name]


def _fetch_manual(entry: ManifestEntry, resources_dir: Path, outputs: list[Path], pins: _Pins) -> None:
    """A file placed by hand: it must be there, and be the file the lock pins (pinned the first time it is seen).
    A folder of images is checked for presence only: hashing every image at every check would cost more than it
    protects."""
    missing = _missing_outputs(outputs)
    if missing:
        raise ManualDownloadRequired(
            f"manifest entry {entry.name!r} cannot be downloaded automatically and "
            f"{', '.join(map(str, missing))} is missing. {entry.manual.strip()}"
        )
    files = {}
    for rel, path in zip(entry.produces, outputs):
        if path.is_file():
            files[rel] = LockedFile(path.stat().st_size, hash_file(path)["sha256"])
            check_pinned_file(entry.name, path, rel, files[rel], pins.locked, pins.path)
    if files:
        record_entry(pins.path, entry.name, LockedEntry(files=files))


def _fetch_file(entry: ManifestEntry, resources_dir: Path, outputs: list[Path], pins: _Pins, **options: Any) -> None:
    """A url/hf entry: download (a verified file returns at once), then extract an archive."""
    target = resources_dir / entry.file
    if entry.archive != "none":
        dest = resources_dir / entry.extract_to
        if _extracted_outputs_verify(entry, target, dest, outputs):
            log.info("%s: outputs already in place and verified; nothing to download", entry.name)
            return
    _download_pinned(entry, target, pins, **options)
    if entry.archive == "none":
        return
    safe_extract(target, dest)
    missing = _missing_outputs(outputs)
    if missing:
        raise MissingOutputError(
            f"manifest entry {entry.name!r}: extracting {target.name} into {dest} did not produce "
            f"{', '.join(map(str, missing))}; fix 'produces' or 'extract_to' in the manifest"
        )
    if not entry.keep_archive:
        target.unlink()
        sidecar_path(target).unlink(missing_ok=True)


def _download_pinned(entry: ManifestEntry, target: Path, pins: _Pins, *, timeout: float, **options: Any) -> None:
    """Download the entry's file at its pinned commit against its pinned digest, then pin what was fetched."""
    sha256, size = expected_file(entry.name, entry.file, sha256=entry.sha256, size=entry.size, locked=pins.locked,
                                 lock_path=pins.path)
    hf, commit, headers = entry.hf, None, {}
    if hf is not None:
        headers = hf_auth_headers()
        commit = (pinned_commit(entry.name, hf.revision, pins.locked, pins.path)
                  or resolve_hf_file_commit(hf, timeout, headers))
        hf = replace(hf, revision=commit)
    url = hf_file_url(hf) if hf is not None else entry_url(entry)
    try:
        download(url, target, sha256=sha256, md5=entry.md5, size=size, timeout=timeout, headers=headers, **options)
    except (ChecksumMismatchError, SizeMismatchError) as error:
        where = "the manifest" if entry.sha256 or entry.size else pins.path
        raise PinnedFileMismatchError(
            f"manifest entry {entry.name!r}: {target} is not the file {where} pins: {error}"
        ) from error
    locked = LockedFile(target.stat().st_size, read_sidecar(target))
    record_entry(pins.path, entry.name, LockedEntry(entry.hf.revision if entry.hf else None, commit,
                                                    {entry.file: locked}))


def hf_auth_headers() -> dict[str, str]:
    """The user's Hugging Face token as a header (gated datasets such as Winoground need it), if there is one."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_hf_file_commit(hf: HFFile, timeout: float = 60, auth: Mapping[str, str] | None = None) -> str:
    """The commit a Hub file's revision (a branch or tag) points at now: the resolve URL's ``X-Repo-Commit``."""
    url = hf_file_url(hf)
    answer = response_headers(url, timeout=timeout, headers=auth)
    headers = {key.lower(): value for key, value in answer.items()}
    commit = headers.get("x-repo-commit")
    if not commit:
        raise ManifestError(f"{url} did not name the commit of revision {hf.revision!r} (no X-Repo-Commit header); "
                            "set the entry's revision to a full commit hash")
    return commit


def _extracted_outputs_verify(entry: ManifestEntry, archive: Path, dest: Path, outputs: list[Path]) -> bool:
    if _missing_outputs(outputs):
        return False
    if not extraction_marker_path(archive, dest).exists():
        return True  # placed there by the user: nothing to check against
    problems = verify_extraction(archive, dest)
    if problems:
        log.warning("%s: earlier extraction is damaged (%s%s); extracting again", entry.name,
                    "; ".join(problems[:3]), f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return not problems


def _fetch_snapshot(entry: ManifestEntry, resources_dir: Path, outputs: list[Path], pins: _Pins) -> None:
    """An hf_snapshot entry: huggingface_hub.snapshot_download of the pinned commit into local_dir, every file
    checked against the lock (or pinned in it), then a listing marker."""
    import huggingface_hub  # imported here: only HF entries need it

    snapshot, local_dir = entry.hf_snapshot, resources_dir / entry.local_dir
    if not _snapshot_problems(local_dir, outputs):
        log.info("%s: snapshot already in %s; nothing to download", entry.name, local_dir)
        return
    commit = pinned_commit(entry.name, snapshot.revision, pins.locked, pins.path)
    if commit is None:
        api = huggingface_hub.HfApi(endpoint=_hf_endpoint())
        commit = api.repo_info(snapshot.repo_id, repo_type=snapshot.repo_type, revision=snapshot.revision).sha
    huggingface_hub.snapshot_download(
        repo_id=snapshot.repo_id,
        repo_type=snapshot.repo_type,
        revision=commit,
        local_dir=str(local_dir),
        allow_patterns=list(snapshot.allow_patterns) if snapshot.allow_patterns else None,
        endpoint=_hf_endpoint(),
    )
    problems = [f"{p} is missing" for p in _missing_outputs(outputs)] + _missing_index_shards(local_dir)
    if problems:
        raise MissingOutputError(f"manifest entry {entry.name!r}: snapshot of {snapshot.repo_id}@"
                                 f"{commit} in {local_dir} is incomplete: {'; '.join(problems)}")
    files = _pinned_snapshot_files(entry, local_dir, pins)
    record_entry(pins.path, entry.name, LockedEntry(snapshot.revision, commit, files))
    write_json(local_dir / SNAPSHOT_MARKER, {
        "repo_id": snapshot.repo_id, "repo_type": snapshot.repo_type, "revision": snapshot.revision,
        "commit": commit, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {rel: pin.size for rel, pin in files.items()},
    })


def _pinned_snapshot_files(entry: ManifestEntry, local_dir: Path, pins: _Pins) -> dict[str, LockedFile]:
    """Size and sha256 of every file of a snapshot, each checked against its pin; a pinned file that is not
    there is an error too."""
    listed, _ = tree_listing(local_dir)
    files = {}
    for rel in sorted(r for r in listed if not r.startswith(".cache" + os.sep) and r != SNAPSHOT_MARKER):
        path = local_dir / rel
        files[rel] = LockedFile(path.stat().st_size, hash_file(path)["sha256"])
        check_pinned_file(entry.name, path, rel, files[rel], pins.locked, pins.path)
    for rel, sha256 in (entry.files_sha256 or {}).items():
        actual = files[rel].sha256 if rel in files else "nothing (the file is missing)"
        if actual != sha256:
            raise PinnedFileMismatchError(f"manifest entry {entry.name!r}: {local_dir / rel} is not the file the "
                                          f"manifest pins: expected sha256 {sha256}, got {actual}")
    absent = sorted(set(pins.locked.files) - set(files)) if pins.locked else []
    if absent:
        raise PinnedFileMismatchError(f"manifest entry {entry.name!r}: {pins.path} pins {', '.join(absent)}, which "
                                      f"the snapshot in {local_dir} does not have")
    return files


def _snapshot_problems(local_dir: Path, outputs: list[Path]) -> list[str]:
    problems = [f"{p} is missing" for p in _missing_outputs(outputs)]
    if problems:
        return problems
    problems = _missing_index_shards(local_dir)
    marker = local_dir / SNAPSHOT_MARKER
    if marker.exists():  # ours: every listed file must still be there at its size
        for rel, size in json.loads(marker.read_text())["files"].items():
            path = local_dir / rel
            if not path.is_file() or path.stat().st_size != size:
                problems.append(f"{path} is missing or changed size")
    return problems


def _missing_index_shards(local_dir: Path) -> list[str]:
    """Weight shards named by a ``*.safetensors.index.json`` that are not on disk."""
    problems = []
    for index in sorted(local_dir.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{index} is unreadable: {error!r}")
            continue
        problems += [f"shard {local_dir / s} named by {index.name} is missing" for s in sorted(shards)
                     if not (local_dir / s).is_file()]
    return problems


def _write_fetch_record(entry: ManifestEntry, resources_dir: Path, outputs: list[Path]) -> None:
    source: Any = entry.url or entry.manual
    if entry.hf is not None:
        source = {"repo_id": entry.hf.repo_id, "repo_type": entry.hf.repo_type, "revision": entry.hf.revision,
                  "filename": entry.hf.filename}
    elif entry.hf_snapshot is not None:
        source = {"repo_id": entry.hf_snapshot.repo_id, "repo_type": entry.hf_snapshot.repo_type,
                  "revision": entry.hf_snapshot.revision}
    downloaded = resources_dir / entry.file if entry.file else None
    write_json(fetch_record_path(entry.name, resources_dir), {
        "entry": entry.name,
        "source": source,
        "sha256": read_sidecar(downloaded) if downloaded else None,
        "outputs": [str(p) for p in outputs],
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
