"""Data: downloading the raw datasets and turning them into typed Parquet.

Kept import-light on purpose (no pandas/pyarrow here): the submodules are imported where needed, e.g.
``from hnclip.data.hnc import write_pair_shards``. Only the shared exceptions and the image-existence
check live here, so every reader reports bad input the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Literal

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
