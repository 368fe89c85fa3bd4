"""Downloads that are resumable, verified and atomic, safe archive extraction, and the download manifest.

Three layers, each usable on its own:

- :func:`download` fetches one URL over HTTP(S) with the standard library: it resumes a ``<file>.part``
  with an HTTP Range request (If-Range guards against gluing two versions of a file), retries transient failures with exponential backoff, verifies size and
  checksums, records the sha256 it computed in a sidecar ``<file>.sha256`` and renames the part onto the
  final name only after verification. A file without its final name was never verified.
- :func:`safe_extract` unpacks a zip or tar (gz too) into a staging folder beside the destination,
  refusing any member that could land outside it, then moves the result into place and leaves a marker
  listing every extracted file (:func:`verify_extraction` checks it later).
- :func:`load_manifest` / :func:`fetch_manifest_entry` read ``resources/manifest.yaml`` (one entry per
  thing to fetch: URL or Hugging Face file or snapshot, size, checksums, archive type, outputs) and fetch
  one entry, doing nothing when its outputs are already there and verify.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from tqdm import tqdm

from hnclip import __version__
from hnclip.io import write_json, write_text

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = f"hnclip/{__version__} (python-urllib)"
# A progress bar that redraws every second fills a Snakemake log with carriage returns; redraw rarely there.
PROGRESS_INTERVAL_S = 1.0 if sys.stderr.isatty() else 30.0
HASH_ALGORITHMS = {"sha256": 64, "md5": 32}  # algorithm -> hex digits


# --------------------------------------------------------------------------------------------- errors
class DownloadError(RuntimeError):
    """A download failed; the message names the URL."""


class HTTPStatusError(DownloadError):
    """The server answered with an error status that retrying will not fix (a 4xx other than 408/429)."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"download of {url} failed: HTTP {status} {reason} (not retried)")
        self.url, self.status = url, status


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not hash to the expected digest; the partial file has been deleted."""

    def __init__(self, url: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(
            f"download of {url} failed verification: {algorithm} expected {expected}, got {actual}; "
            "the partial file was deleted"
        )
        self.url, self.algorithm, self.expected, self.actual = url, algorithm, expected, actual


class SizeMismatchError(DownloadError):
    """The download (or the server's announced length) does not have the expected size."""

    def __init__(self, url: str, expected: int, actual: int, what: str = "received") -> None:
        super().__init__(f"download of {url}: expected {expected} bytes, {what} {actual}; the partial file was deleted")
        self.url, self.expected, self.actual = url, expected, actual


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the destination (or is a device file); nothing was extracted."""

    def __init__(self, archive: str | os.PathLike, member: str, reason: str) -> None:
        super().__init__(f"{archive}: refusing member {member!r}: {reason}; nothing was extracted")
        self.archive, self.member = str(archive), member


class ArchiveFormatError(ValueError):
    """A file meant to be an archive is neither a zip nor a tar."""


class ManifestError(ValueError):
    """The download manifest is malformed; the message names the file, the entry and the key."""


class MissingOutputError(RuntimeError):
    """A fetched entry did not produce the files its manifest entry promises."""


class ManualDownloadRequired(RuntimeError):
    """The entry cannot be fetched automatically and its outputs are not there yet."""


class _IncompleteTransferError(Exception):
    """Internal: the transfer stopped early or must restart; always retried."""


# Failures worth another attempt; HTTP errors are sorted by status in _transfer_with_retries.
_TRANSIENT_ERRORS = (
    urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _IncompleteTransferError,
)


def _sleep(seconds: float) -> None:
    """Indirection so tests can record backoff delays instead of waiting."""
    time.sleep(seconds)


# ---------------------------------------------------------------------------------- checksums, sidecars
def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the verified sha256 of ``path`` is recorded (``sha256sum -c`` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for ``path``, or None when there is no (well-formed) sidecar."""
    try:
        text = sidecar_path(path).read_text()
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text.split() else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _new_hashers(algorithms: Iterable[str]) -> dict[str, Any]:
    return {name: hashlib.new(name) for name in algorithms}


def hash_file(path: str | os.PathLike, algorithms: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm, in one pass."""
    hashers = _new_hashers(algorithms)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


@dataclass(frozen=True)
class _Expected:
    """What a download must turn out to be; None = unknown, not checked."""

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def algorithms(self) -> tuple[str, ...]:
        # sha256 is always computed: it goes into the sidecar even when nobody told us what to expect.
        return ("sha256", "md5") if self.md5 else ("sha256",)


def _normalise_digest(value: str | None, algorithm: str) -> str | None:
    if value is None:
        return None
    digest = str(value).strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{HASH_ALGORITHMS[algorithm]}}}", digest):
        raise ValueError(f"{algorithm} must be {HASH_ALGORITHMS[algorithm]} hex digits, got {value!r}")
    return digest


def existing_file_verifies(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    rehash: bool = False,
) -> bool:
    """Whether ``path`` exists and matches what is expected of it.

    A sidecar written after a verified download is trusted (no re-hash of a 20 GB file on every run)
    unless the file changed after it was written or ``rehash`` is set. A file with no sidecar (say, one
    the user copied in) is hashed once; if it verifies, its sidecar is written.
    """
    path = Path(path)
    expected = _Expected(_normalise_digest(sha256, "sha256"), _normalise_digest(md5, "md5"), size)
    if not path.is_file():
        return False
    if expected.size is not None and path.stat().st_size != expected.size:
        return False
    recorded = read_sidecar(path)
    sidecar_is_current = recorded is not None and sidecar_path(path).stat().st_mtime >= path.stat().st_mtime
    if sidecar_is_current and not rehash:
        return expected.sha256 is None or recorded == expected.sha256
    digests = hash_file(path, expected.algorithms)
    if any(getattr(expected, name) not in (None, digests[name]) for name in expected.algorithms):
        return False
    _write_sidecar(path, digests["sha256"])
    return True


def _write_sidecar(path: Path, sha256: str) -> None:
    write_text(sidecar_path(path), f"{sha256}  {path.name}\n")


# ------------------------------------------------------------------------------------------ download
def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    size: int | None = None,
    md5: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60,
    rehash: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, verified, atomic) and return ``dest``.

    Bytes go to ``<dest>.part``; an interrupted transfer resumes from its length with ``Range:
    bytes=N-`` and ``If-Range`` naming the version the part began with (ETag or Last-Modified, kept in
    ``<dest>.part.json``), so a server that answers 200 instead of 206, because it ignores ranges or
    the file changed, restarts it from zero. Connection errors,
    timeouts, early closes, 5xx, 408 and 429 are retried ``retries`` times, waiting ``backoff * 2**k``
    seconds; other 4xx raise :class:`HTTPStatusError` at once. When the transfer is complete its size
    and checksums are checked: a mismatch deletes the part and raises :class:`SizeMismatchError` /
    :class:`ChecksumMismatchError` naming URL, expected and actual. Only then is the computed sha256
    written to ``<dest>.sha256`` and the part renamed to ``dest``. An existing ``dest`` that verifies is
    returned without any network access (see :func:`existing_file_verifies`).
    """
    _require_http_url(url)
    dest = Path(dest)
    expected = _Expected(_normalise_digest(sha256, "sha256"), _normalise_digest(md5, "md5"), size)
    if existing_file_verifies(dest, sha256=expected.sha256, md5=expected.md5, size=size, rehash=rehash):
        log.info("%s is already downloaded and verified", dest)
        return dest
    if dest.exists():
        log.warning("%s exists but does not verify; downloading %s again", dest, url)
        dest.unlink()
        sidecar_path(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digests = _transfer_with_retries(url, part, expected, retries=retries, backoff=backoff, timeout=timeout)
    _verify_transfer(url, part, digests, expected)
    _write_sidecar(dest, digests["sha256"])  # before the rename, so a final file always has its sidecar
    os.replace(part, dest)
    _part_record_path(part).unlink(missing_ok=True)
    log.info("downloaded %s to %s (sha256 %s)", url, dest, digests["sha256"])
    return dest


def _require_http_url(url: str) -> None:
    # urllib would also open file:// and ftp:// URLs; a manifest typo should not read local files.
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be downloaded, got {url!r}")


def _is_retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status < 600


def _transfer_with_retries(
    url: str, part: Path, expected: _Expected, *, retries: int, backoff: float, timeout: float
) -> dict[str, str]:
    """Run transfer attempts until one completes; return the digests of the complete part file."""
    last_error: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d of %d failed (%s); retrying in %.3g s", url, attempt, retries + 1,
                        last_error, delay)
            _sleep(delay)
        try:
            return _transfer_once(url, part, expected, timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if not _is_retryable_status(error.code):
                raise HTTPStatusError(url, error.code, str(error.reason)) from None
            last_error = error
        except _TRANSIENT_ERRORS as error:
            last_error = error
    kept = f"; {part} is kept so that the next run resumes it" if part.exists() else ""
    raise DownloadError(
        f"download of {url} failed after {retries + 1} attempts; last error: {last_error}{kept}"
    ) from last_error


def _transfer_once(url: str, part: Path, expected: _Expected, timeout: float) -> dict[str, str]:
    """One HTTP request: resume or restart ``part`` and stream the body into it."""
    validator = _resume_validator(part, url)
    offset = _resumable_offset(part, expected.size)
    if expected.size is not None and offset == expected.size:
        return hash_file(part, expected.algorithms)  # an earlier run got every byte but stopped before verifying
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            # If the remote file changed since the part began, the server sends all of it (200), not the rest.
            headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            error.close()
            return _finish_unsatisfiable_range(url, part, offset, error.headers, expected)
        raise
    with response:
        start, total = _response_span(url, part, response, offset)
        if total is not None and expected.size is not None and total != expected.size:
            _discard_part(part)
            raise SizeMismatchError(url, expected.size, total, what="the server announces")
        if start == 0:
            _record_part_validator(part, url, response.headers)
        hashers = _hashers_after_prefix(part, start, expected.algorithms)
        _stream_body(response, part, start, total, hashers)
    received = part.stat().st_size
    if total is not None and received < total:
        raise _IncompleteTransferError(f"connection closed after {received} of {total} bytes")
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _part_record_path(part: Path) -> Path:
    """Beside a part: the URL it comes from and the validator (ETag / Last-Modified) to resume it with."""
    return part.with_name(part.name + ".json")


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_record_path(part).unlink(missing_ok=True)


def _record_part_validator(part: Path, url: str, headers: Mapping[str, str]) -> None:
    etag = headers.get("ETag")
    # A weak ETag may not be used in If-Range (RFC 9110 13.1.5); Last-Modified may.
    validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    write_json(_part_record_path(part), {"url": url, "validator": validator})


def _resume_validator(part: Path, url: str) -> str | None:
    """The validator recorded when ``part`` was begun; a part begun from another URL is discarded."""
    try:
        record = json.loads(_part_record_path(part).read_text())
    except (FileNotFoundError, ValueError):
        return None
    begun_from = record.get("url") if isinstance(record, dict) else None
    if begun_from != url:
        log.warning("%s was begun from %s, not %s; starting over", part, begun_from, url)
        _discard_part(part)
        return None
    return record.get("validator")


def _resumable_offset(part: Path, size: int | None) -> int:
    if not part.exists():
        return 0
    offset = part.stat().st_size
    if size is not None and offset > size:
        log.warning("%s is longer than the expected %d bytes; starting over", part, size)
        _discard_part(part)
        return 0
    return offset


def _response_span(url: str, part: Path, response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """(first byte of the body within the file, total file length or None)."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            _discard_part(part)
            raise _IncompleteTransferError(
                f"asked to resume at byte {offset}, got Content-Range "
                f"{response.headers.get('Content-Range')!r}; starting over"
            )
        return offset, None if match.group(3) == "*" else int(match.group(3))
    if offset:
        log.warning("%s ignored the Range request (HTTP %d); restarting from byte 0", url, response.status)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _finish_unsatisfiable_range(
    url: str, part: Path, offset: int, headers: Mapping[str, str], expected: _Expected
) -> dict[str, str]:
    """HTTP 416 for ``Range: bytes=N-``: the part is complete when the file is N bytes long."""
    match = re.fullmatch(r"bytes \*/(\d+)", (headers.get("Content-Range") or "").strip())
    if match and int(match.group(1)) == offset:
        return hash_file(part, expected.algorithms)
    _discard_part(part)
    raise _IncompleteTransferError(f"{url} refused to resume at byte {offset} (HTTP 416); starting over")


def _hashers_after_prefix(part: Path, start: int, algorithms: Iterable[str]) -> dict[str, Any]:
    """Hashers primed with the first ``start`` bytes already in ``part`` (none when restarting)."""
    hashers = _new_hashers(algorithms)
    if start:
        with open(part, "rb") as handle:
            remaining = start
            while remaining and (chunk := handle.read(min(CHUNK_BYTES, remaining))):
                remaining -= len(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
    return hashers


def _stream_body(response: http.client.HTTPResponse, part: Path, start: int, total: int | None,
                 hashers: dict[str, Any]) -> None:
    with open(part, "ab" if start else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
        desc=part.name.removesuffix(".part"), mininterval=PROGRESS_INTERVAL_S,
    ) as bar:
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))


def _verify_transfer(url: str, part: Path, digests: dict[str, str], expected: _Expected) -> None:
    actual_size = part.stat().st_size
    if expected.size is not None and actual_size != expected.size:
        _discard_part(part)
        raise SizeMismatchError(url, expected.size, actual_size)
    for algorithm in expected.algorithms:
        wanted = getattr(expected, algorithm)
        if wanted is not None and digests[algorithm] != wanted:
            _discard_part(part)
            raise ChecksumMismatchError(url, algorithm, wanted, digests[algorithm])


# ------------------------------------------------------------------------------------ safe extraction
def extraction_marker_path(archive_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """The marker that :func:`safe_extract` leaves in ``dest_dir`` listing what ``archive_path`` held."""
    return Path(dest_dir) / f".{Path(archive_path).name}.extracted.json"


def detect_archive_kind(archive_path: str | os.PathLike) -> str:
    """``"zip"`` or ``"tar"`` (any compression tarfile reads), from the file's content, not its name."""
    archive_path = Path(archive_path)
    if not archive_path.is_file():
        raise FileNotFoundError(f"archive {archive_path} does not exist")
    with open(archive_path, "rb") as handle:
        head = handle.read(4)
    # zipfile.is_zipfile scans for a trailing directory record, which a tar holding a zip also has.
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if tarfile.is_tarfile(archive_path):
        return "tar"
    if zipfile.is_zipfile(archive_path):
        return "zip"
    raise ArchiveFormatError(f"{archive_path} is neither a zip nor a tar archive (it starts with {head!r})")


def safe_extract(archive_path: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Extract a zip or tar(.gz) into ``dest_dir`` safely and atomically; return the extracted paths.

    Every member is checked before it is written: a ``..`` component, an absolute path, a symlink or
    hard link resolving outside the destination, writing through an earlier link to outside, and
    device files, FIFOs and other special members raise :class:`UnsafeArchiveError` naming the member.
    Tar members additionally pass through tarfile's ``data`` filter.

    Extraction goes to a staging folder beside ``dest_dir``; nothing reaches ``dest_dir`` unless the
    whole archive extracted cleanly. A new ``dest_dir`` is created by one rename. An existing one is
    merged into, one top-level entry at a time (each a rename, replacing an entry of the same name), so
    that several archives can share a folder (e.g. GQA's images and scene graphs in ``raw/gqa``). The
    marker (:func:`extraction_marker_path`, listing every file and its size) is moved in last.
    """
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    # Stage beside where dest_dir really is (it may be a link to another file system): renames need one.
    real_dest = Path(os.path.realpath(dest_dir))
    extract_members = {"zip": _extract_zip_members, "tar": _extract_tar_members}[detect_archive_kind(archive_path)]
    real_dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{real_dest.name}.extracting-", dir=real_dest.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; it becomes dest_dir
        extract_members(archive_path, staging)
        _check_links_stay_inside(archive_path, staging)
        files, symlinks = _listing(staging)
        marker = extraction_marker_path(archive_path, staging)
        write_json(marker, {
            "archive": archive_path.name,
            "archive_sha256": read_sidecar(archive_path),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "symlinks": symlinks,
        })
        _publish(staging, real_dest, marker.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("extracted %d files of %s into %s", len(files), archive_path, dest_dir)
    return sorted(dest_dir / rel for rel in [*files, *symlinks])


def verify_extraction(archive_path: str | os.PathLike, dest_dir: str | os.PathLike) -> list[str]:
    """Problems with an earlier extraction of ``archive_path`` into ``dest_dir`` (empty list = intact).

    Checks that the marker exists and that every file it lists is there with its extracted size.
    """
    marker = extraction_marker_path(archive_path, dest_dir)
    try:
        record = json.loads(marker.read_text())
        files, symlinks = dict(record["files"]), dict(record["symlinks"])
    except FileNotFoundError:
        return [f"extraction marker {marker} is missing"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"extraction marker {marker} is unreadable: {error!r}"]
    problems = []
    for rel, size in files.items():
        path = Path(dest_dir) / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if actual != size:
            problems.append(f"{path} has {actual} bytes, {size} were extracted")
    problems += [f"{Path(dest_dir) / rel} is missing" for rel in symlinks if not os.path.lexists(Path(dest_dir) / rel)]
    return problems


def _inside(root_real: str, path_real: str) -> bool:
    return path_real == root_real or path_real.startswith(root_real + os.sep)


def _check_member_name(archive: Path, name: str) -> None:
    parts = re.split(r"[\\/]", name)
    if not name or "\x00" in name:
        raise UnsafeArchiveError(archive, name, "empty name or NUL byte")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:([\\/]|$)", name):
        raise UnsafeArchiveError(archive, name, "absolute path")
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' path component")


def _check_target_inside(archive: Path, name: str, root_real: str, target: str) -> None:
    # realpath, not a string check: an earlier member may be a link that this path would write through.
    if not _inside(root_real, os.path.realpath(target)):
        raise UnsafeArchiveError(archive, name, "would be written outside the destination (through a link)")


def _check_symlink_target(archive: Path, name: str, link: str, root_real: str, target: str) -> None:
    if os.path.isabs(link) or link.startswith("\\"):
        raise UnsafeArchiveError(archive, name, f"symlink to an absolute path ({link})")
    resolved = os.path.realpath(os.path.join(os.path.realpath(os.path.dirname(target)), link))
    if not _inside(root_real, resolved):
        raise UnsafeArchiveError(archive, name, f"symlink pointing outside the destination ({link})")


def _check_hardlink_target(archive: Path, name: str, link: str, root_real: str, staging: Path) -> None:
    # A tar hard link names another member, relative to the archive root.
    if os.path.isabs(link) or ".." in re.split(r"[\\/]", link) or not _inside(
        root_real, os.path.realpath(os.path.join(staging, link))
    ):
        raise UnsafeArchiveError(archive, name, f"hard link to {link}, outside the destination")


def _extract_zip_members(archive: Path, staging: Path) -> None:
    root_real = os.path.realpath(staging)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in tqdm(members, desc=f"extract {archive.name}", unit="file", mininterval=PROGRESS_INTERVAL_S):
            name = info.filename
            _check_member_name(archive, name)
            target = os.path.join(staging, name)
            _check_target_inside(archive, name, root_real, target)
            file_type = stat.S_IFMT(info.external_attr >> 16)  # Unix mode bits, 0 for zips made elsewhere
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
            elif file_type == stat.S_IFLNK:
                link = zf.read(info).decode("utf-8")
                _check_symlink_target(archive, name, link, root_real, target)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(link, target)
            elif file_type in (0, stat.S_IFREG):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
            else:
                raise UnsafeArchiveError(archive, name, f"special file (mode {oct(file_type)})")


def _describe_tar_type(member: tarfile.TarInfo) -> str:
    for test, description in ((member.ischr, "character device"), (member.isblk, "block device"),
                              (member.isfifo, "FIFO")):
        if test():
            return description
    return f"tar member type {member.type!r}"


def _extract_tar_members(archive: Path, staging: Path) -> None:
    root_real = os.path.realpath(staging)
    with tarfile.open(archive, "r:*") as tf:
        for member in tqdm(tf, desc=f"extract {archive.name}", unit="file", mininterval=PROGRESS_INTERVAL_S):
            _check_member_name(archive, member.name)
            target = os.path.join(staging, member.name)
            _check_target_inside(archive, member.name, root_real, target)
            if member.issym():
                _check_symlink_target(archive, member.name, member.linkname, root_real, target)
            elif member.islnk():
                _check_hardlink_target(archive, member.name, member.linkname, root_real, staging)
            elif not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError(archive, member.name, f"special file ({_describe_tar_type(member)})")
            try:
                tf.extract(member, staging, filter="data")  # a second, independent line of defence
            except tarfile.FilterError as error:
                raise UnsafeArchiveError(archive, member.name, f"refused by tarfile's data filter: {error}") from error


def _check_links_stay_inside(archive: Path, staging: Path) -> None:
    """After extraction: no symlink may resolve outside (catches chains no single member reveals)."""
    root_real = os.path.realpath(staging)
    for folder, dirnames, filenames in os.walk(staging):
        for entry in [*dirnames, *filenames]:
            path = os.path.join(folder, entry)
            if os.path.islink(path) and not _inside(root_real, os.path.realpath(path)):
                member = os.path.relpath(path, staging)
                raise UnsafeArchiveError(archive, member, "link resolves outside the destination")


def _listing(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Regular files (relative path -> size) and symlinks (relative path -> target) under ``root``."""
    files: dict[str, int] = {}
    symlinks: dict[str, str] = {}
    for folder, dirnames, filenames in os.walk(root):
        for entry in sorted([*dirnames, *filenames]):
            path = os.path.join(folder, entry)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                symlinks[rel] = os.readlink(path)
            elif os.path.isfile(path):
                files[rel] = os.path.getsize(path)
    return files, symlinks


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _publish(staging: Path, dest_dir: Path, marker_name: str) -> None:
    """Move the staged extraction into ``dest_dir`` (see :func:`safe_extract`); the marker goes last."""
    if not dest_dir.exists():
        os.replace(staging, dest_dir)
        return
    entries = sorted(name for name in os.listdir(staging) if name != marker_name) + [marker_name]
    for name in entries:
        target = dest_dir / name
        if os.path.lexists(target):
            log.warning("replacing %s with the freshly extracted copy", target)
            _remove(target)
        os.replace(staging / name, target)


# ------------------------------------------------------------------------------------------- manifest
ARCHIVE_KINDS = ("zip", "tar", "tar.gz", "none")
SOURCE_KEYS = ("url", "hf", "hf_snapshot", "manual")
_COMMON_KEYS = {"description", "notes", "produces"}
_FILE_KEYS = {"file", "size", "sha256", "md5", "archive", "extract_to", "keep_archive"}
_ALLOWED_KEYS = {
    "url": _COMMON_KEYS | _FILE_KEYS | {"url"},
    "hf": _COMMON_KEYS | _FILE_KEYS | {"hf"},
    "hf_snapshot": _COMMON_KEYS | {"hf_snapshot", "local_dir"},
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


def _as_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _as_relative_path(value: Any) -> str:
    text = _as_string(value)
    if os.path.isabs(text) or ".." in Path(text).parts:
        raise ValueError(f"must be a path relative to the resources folder without '..', got {value!r}")
    return os.path.normpath(text)


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
        "sha256": reader.get("sha256", lambda v: _normalise_digest(v, "sha256"), required=True),
        "md5": reader.get("md5", lambda v: _normalise_digest(v, "md5")),
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
            _require_http_url(fields["url"])
        except ValueError as problem:
            raise reader.error("url", str(problem)) from None
    elif source == "hf":
        fields["hf"] = reader.get("hf", _as_hf_file, required=True)
    elif source == "hf_snapshot":
        fields["hf_snapshot"] = reader.get("hf_snapshot", _as_hf_snapshot, required=True)
        fields["local_dir"] = reader.get("local_dir", _as_relative_path, required=True)
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
    hand, without a marker, are taken as they are). Writes :func:`fetch_record_path` at the end.
    """
    entry = _entry_named(load_manifest(manifest_path), name, manifest_path)
    resources_dir = Path(resources_dir)
    outputs = [resources_dir / rel for rel in entry.produces]
    if entry.source == "manual":
        _fetch_manual(entry, outputs)
    elif entry.source == "hf_snapshot":
        _fetch_snapshot(entry, resources_dir, outputs)
    else:
        _fetch_file(entry, resources_dir, outputs, retries=retries, backoff=backoff, timeout=timeout, rehash=rehash)
    _write_fetch_record(entry, resources_dir, outputs)
    return outputs


def _entry_named(entries: dict[str, ManifestEntry], name: str, manifest_path: str | os.PathLike) -> ManifestEntry:
    if name not in entries:
        raise ManifestError(f"{manifest_path} has no entry {name!r} (entries: {', '.join(entries)})")
    return entries[name]


def _fetch_manual(entry: ManifestEntry, outputs: list[Path]) -> None:
    missing = _missing_outputs(outputs)
    if missing:
        raise ManualDownloadRequired(
            f"manifest entry {entry.name!r} cannot be downloaded automatically and "
            f"{', '.join(map(str, missing))} is missing. {entry.manual.strip()}"
        )


def _fetch_file(entry: ManifestEntry, resources_dir: Path, outputs: list[Path], **options: Any) -> None:
    """A url/hf entry: download (a verified file returns at once), then extract an archive."""
    target = resources_dir / entry.file
    verify = {"sha256": entry.sha256, "md5": entry.md5, "size": entry.size}
    if entry.archive == "none":
        download(entry_url(entry), target, **verify, **options)
        return
    dest = resources_dir / entry.extract_to
    if _extracted_outputs_verify(entry, target, dest, outputs):
        log.info("%s: outputs already in place and verified; nothing to download", entry.name)
        return
    download(entry_url(entry), target, **verify, **options)
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


def _fetch_snapshot(entry: ManifestEntry, resources_dir: Path, outputs: list[Path]) -> None:
    """An hf_snapshot entry: huggingface_hub.snapshot_download into local_dir, then a listing marker."""
    import huggingface_hub  # imported here: only HF entries need it

    snapshot, local_dir = entry.hf_snapshot, resources_dir / entry.local_dir
    if not _snapshot_problems(local_dir, outputs):
        log.info("%s: snapshot already in %s; nothing to download", entry.name, local_dir)
        return
    huggingface_hub.snapshot_download(
        repo_id=snapshot.repo_id,
        repo_type=snapshot.repo_type,
        revision=snapshot.revision,
        local_dir=str(local_dir),
        allow_patterns=list(snapshot.allow_patterns) if snapshot.allow_patterns else None,
        endpoint=_hf_endpoint(),
    )
    problems = [f"{p} is missing" for p in _missing_outputs(outputs)] + _missing_index_shards(local_dir)
    if problems:
        raise MissingOutputError(f"manifest entry {entry.name!r}: snapshot of {snapshot.repo_id}@"
                                 f"{snapshot.revision} in {local_dir} is incomplete: {'; '.join(problems)}")
    files, symlinks = _listing(local_dir)
    write_json(local_dir / SNAPSHOT_MARKER, {
        "repo_id": snapshot.repo_id, "repo_type": snapshot.repo_type, "revision": snapshot.revision,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {rel: size for rel, size in files.items() if not rel.startswith(".cache" + os.sep)},
    })


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
