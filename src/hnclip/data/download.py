"""Resumable, verified, atomic downloads over HTTP(S) with the standard library.

:func:`download` resumes a ``<file>.part`` with an HTTP Range request (If-Range guards against gluing two
versions of a file), retries transient failures with exponential backoff, verifies size and checksums, records
the sha256 it computed in a sidecar ``<file>.sha256`` and renames the part onto the final name only after
verification. A file without its final name was never verified.

The layer above, :mod:`hnclip.data.manifest`, decides what to fetch; :mod:`hnclip.data.archive` unpacks it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

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


def normalise_digest(value: str | None, algorithm: str) -> str | None:
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
    expected = _Expected(normalise_digest(sha256, "sha256"), normalise_digest(md5, "md5"), size)
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
    headers: Mapping[str, str] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, retried, verified, atomic) and return ``dest``.

    ``headers`` go with every request (a gated Hugging Face file needs ``Authorization``).

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
    require_http_url(url)
    dest = Path(dest)
    expected = _Expected(normalise_digest(sha256, "sha256"), normalise_digest(md5, "md5"), size)
    if existing_file_verifies(dest, sha256=expected.sha256, md5=expected.md5, size=size, rehash=rehash):
        log.info("%s is already downloaded and verified", dest)
        return dest
    if dest.exists():
        log.warning("%s exists but does not verify; downloading %s again", dest, url)
        dest.unlink()
        sidecar_path(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digests = _transfer_with_retries(url, part, expected, retries=retries, backoff=backoff, timeout=timeout,
                                     headers=dict(headers or {}))
    _verify_transfer(url, part, digests, expected)
    _write_sidecar(dest, digests["sha256"])  # before the rename, so a final file always has its sidecar
    os.replace(part, dest)
    _part_record_path(part).unlink(missing_ok=True)
    log.info("downloaded %s to %s (sha256 %s)", url, dest, digests["sha256"])
    return dest


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the first answer's headers are wanted, not the redirect target's


def response_headers(url: str, *, timeout: float = 60, headers: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The headers of a HEAD request to ``url``, redirects not followed (the Hub names the commit a revision
    resolves to in the first answer, ``X-Repo-Commit``, then redirects large files to a CDN)."""
    require_http_url(url)
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        with urllib.request.build_opener(_KeepRedirects).open(request, timeout=timeout) as response:
            return dict(response.headers.items())
    except urllib.error.HTTPError as error:
        error.close()
        if 300 <= error.code < 400:
            return dict(error.headers.items())
        raise HTTPStatusError(url, error.code, str(error.reason)) from None


def require_http_url(url: str) -> None:
    # urllib would also open file:// and ftp:// URLs; a manifest typo should not read local files.
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs can be downloaded, got {url!r}")


def _is_retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status < 600


def _transfer_with_retries(
    url: str, part: Path, expected: _Expected, *, retries: int, backoff: float, timeout: float,
    headers: dict[str, str],
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
            return _transfer_once(url, part, expected, timeout, headers)
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


def _transfer_once(url: str, part: Path, expected: _Expected, timeout: float, extra_headers: dict[str, str]) -> dict[str, str]:
    """One HTTP request: resume or restart ``part`` and stream the body into it."""
    validator = _resume_validator(part, url)
    offset = _resumable_offset(part, expected.size)
    if expected.size is not None and offset == expected.size:
        return hash_file(part, expected.algorithms)  # an earlier run got every byte but stopped before verifying
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **extra_headers}
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
