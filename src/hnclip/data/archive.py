"""Safe archive extraction.

:func:`safe_extract` unpacks a zip or tar (gz too) into a staging folder beside the destination, refusing any
member that could land outside it, then moves the result into place and leaves a marker listing every extracted
file (:func:`verify_extraction` checks it later).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from hnclip.data.download import CHUNK_BYTES, PROGRESS_INTERVAL_S, read_sidecar
from hnclip.io import write_json

log = logging.getLogger(__name__)


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the destination (or is a device file); nothing was extracted."""

    def __init__(self, archive: str | os.PathLike, member: str, reason: str) -> None:
        super().__init__(f"{archive}: refusing member {member!r}: {reason}; nothing was extracted")
        self.archive, self.member = str(archive), member


class ArchiveFormatError(ValueError):
    """A file meant to be an archive is neither a zip nor a tar."""

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
        files, symlinks = tree_listing(staging)
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


def tree_listing(root: Path) -> tuple[dict[str, int], dict[str, str]]:
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
