"""Data: downloading the raw datasets and turning them into typed Parquet.

Kept import-light on purpose (no pandas/pyarrow here): the submodules are imported where needed, e.g.
``from hnclip.data.hnc import write_pair_shards``. Only the shared exceptions and the image-existence
check live here, so every reader reports bad input the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Literal

log = logging.getLogger(__name__)

OnMissingImage = Literal["error", "skip"]
ON_MISSING_IMAGE_CHOICES = ("error", "skip")


class DataFormatError(ValueError):
    """An input file does not have the documented format; the message names the file and record."""


class MissingImageError(FileNotFoundError):
    """An image referenced by an annotation file is not on disk; the message names the image file."""


def check_on_missing_image(on_missing_image: str) -> None:
    """Refuse an unknown policy early rather than after streaming gigabytes."""
    if on_missing_image not in ON_MISSING_IMAGE_CHOICES:
        raise ValueError(f"on_missing_image must be one of {ON_MISSING_IMAGE_CHOICES}, got {on_missing_image!r}")


def check_images_dir(images_dir: str | os.PathLike) -> Path:
    """The images folder as a Path; a folder that is absent is one clear error, not one per image."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise MissingImageError(f"images directory {images_dir} does not exist (or is not a directory)")
    return images_dir


def missing_image_files(
    image_paths: Iterable[str | os.PathLike],
    *,
    referenced_by: str | os.PathLike,
    on_missing_image: OnMissingImage = "error",
) -> set[str]:
    """The paths among ``image_paths`` that are not files.

    With ``on_missing_image="error"`` the first missing one raises :class:`MissingImageError` naming the
    image file and the annotation file that references it; with ``"skip"`` each missing file is logged and
    returned, so the caller can drop its rows and count them.
    """
    check_on_missing_image(on_missing_image)
    missing: set[str] = set()
    for path in dict.fromkeys(str(p) for p in image_paths):  # unique, in first-seen order
        if os.path.isfile(path):
            continue
        if on_missing_image == "error":
            raise MissingImageError(
                f"image {Path(path).name} referenced by {referenced_by} is missing (looked for {path}); "
                "pass on_missing_image='skip' to drop its rows instead"
            )
        log.warning("skipping rows of missing image %s (referenced by %s)", path, referenced_by)
        missing.add(path)
    return missing


def load_json(path: str | os.PathLike, error: type[DataFormatError] = DataFormatError) -> Any:
    """``json.load`` of a UTF-8 file; malformed JSON or bad bytes raise ``error`` naming the file and position."""
    path = Path(path)
    try:
        # Decode the whole file at once so a bad byte's position is its offset in the file.
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not valid UTF-8 (byte {problem.start}: {problem.reason})") from problem
    except json.JSONDecodeError as problem:
        raise error(f"{path}: malformed JSON at line {problem.lineno} column {problem.colno}: {problem.msg}") from problem


def record_field(path: Path, record: Any, key: str, what: str, error: type[DataFormatError] = DataFormatError) -> Any:
    """``record[key]``, or ``error`` naming the file and the record (``what``) that lacks it."""
    if not isinstance(record, dict) or key not in record:
        raise error(f"{path}: {what} has no {key!r} field")
    return record[key]


def string_field(path: Path, record: Any, key: str, what: str, error: type[DataFormatError] = DataFormatError) -> str:
    value = record_field(path, record, key, what, error)
    if not isinstance(value, str):
        raise error(f"{path}: {what}: {key!r} must be a string, got {value!r}")
    return value


def rows_with_images(
    rows: list[dict], *, id_key: str, what: str, referenced_by: str | os.PathLike, on_missing_image: OnMissingImage,
    error: type[DataFormatError] = DataFormatError,
) -> tuple[list[dict], set[str]]:
    """``rows`` (each an ``image_path`` and an ``id_key``) minus those whose image is missing, and the missing
    images. Ids must be unique; a missing image raises, or (``"skip"``) its rows are dropped and logged."""
    counts: dict = {}
    for row in rows:
        counts[row[id_key]] = counts.get(row[id_key], 0) + 1
    repeated = [key for key, count in counts.items() if count > 1]
    if repeated:
        raise error(f"{referenced_by}: {what} ids appear more than once: {repeated[:5]}")
    missing = missing_image_files((row["image_path"] for row in rows), referenced_by=referenced_by,
                                  on_missing_image=on_missing_image)
    if not missing:
        return rows, missing
    kept = [row for row in rows if row["image_path"] not in missing]
    log.warning("%s: dropped %d %ss of %d missing images", referenced_by, len(rows) - len(kept), what, len(missing))
    return kept, missing
