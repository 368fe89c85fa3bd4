"""HNC (Hard Negative Captions) → one row per (positive, hard negative) caption pair.

HNC ships two JSON shapes:

* **train/val** ``{image_id: {"captions": {caption_id: record}}}``: a negative (``label`` 0) names its
  positive through ``cpt_p_id``;
* **test** ``{"n123.jpg": {"0": record, "1": record, ...}}``: no wrapper, no links, a pair is
  (caption 2i: label 1, caption 2i+1: label 0) in caption-id order.

Both shapes go through the same streaming reader (``ijson.kvitems`` over the top-level keys, C backend),
so the 8 GB train file is never held in memory: one image's record at a time becomes its pairs, the
pairs are cleaned (identical and repeated pairs dropped and counted) and then either collected
(:func:`read_pairs`) or routed to Parquet shards by a stable hash of the image id
(:func:`write_pair_shards`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, NoReturn, Sequence

import ijson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from hnclip.data import (
    DataFormatError,
    OnMissingImage,
    check_images_dir,
    check_on_missing_image,
    missing_image_files,
)
from hnclip.io import atomic_dir, write_json
from hnclip.provenance import provenance

log = logging.getLogger(__name__)

GROUPS = ("attribute", "relation", "counting", "logic")

#: The 17 train/val negative types and their coarse group (the grouping is ours).
TYPE_GROUPS: dict[str, str] = {
    "attribute": "attribute",
    "object": "attribute",
    "attribute_subg": "attribute",
    "relation_subj": "relation",
    "relation_obj": "relation",
    "relation_pred": "relation",
    "relation_attr_subj": "relation",
    "relation_attr_obj": "relation",
    "relation_attr_pred": "relation",
    "obj_count": "counting",
    "obj_comp_count": "counting",
    "obj_verify_count": "counting",
    "obj_verify_count_attr": "counting",
    "and_logic_attr": "logic",
    "and_logic_rel": "logic",
    "xor_logic_attr": "logic",
    "xor_logic_rel": "logic",
}

#: The test file's 10 type names → the train type they correspond to (inferred from the files' examples).
#: A test type takes its train equivalent's group. Where a test name covers a family ("relation" ≈
#: relation_subj/obj/pred, "relation_attribute" ≈ relation_attr_*), the first member stands for it: every
#: member has the same group.
TEST_TYPE_EQUIVALENTS: dict[str, str] = {
    "verify_object_attribute": "obj_verify_count_attr",
    "verify_object_relation": "obj_verify_count",
    "object_count": "obj_count",
    "object_compare_count": "obj_comp_count",
    "and_logic_relation": "and_logic_rel",
    "xor_logic_relation": "xor_logic_rel",
    "xor_logic_attribute": "xor_logic_attr",
    "relation": "relation_subj",
    "attribute_relation": "attribute_subg",
    "relation_attribute": "relation_attr_subj",
    # in the v1-0 release of the test set (and in the train types, as and_logic_attr), not in the Hub file
    "and_logic_attribute": "and_logic_attr",
}

#: Every known type name (train/val and test) → its group.
_GROUP_OF: dict[str, str] = {
    **TYPE_GROUPS,
    **{test_type: TYPE_GROUPS[train_type] for test_type, train_type in TEST_TYPE_EQUIVALENTS.items()},
}

PAIR_COLUMNS = ("image_id", "positive", "negative", "type", "type_group", "positive_id", "negative_id")

DROP_REASONS = ("identical_pair", "duplicate_pair", "missing_image")
# Test captions that make no pair, by reason: counted and reported, never a stop (the human-annotated test file
# is small and hand-edited; one odd record should not cost the other 871 pairs).
TEST_SKIP_REASONS = ("unpaired", "empty_caption", "bad_label", "unknown_type", "not_a_record")

SHAPE_TRAIN_VAL = "train_val"
SHAPE_TEST = "test"

# Rows held in memory across all shard buffers before they are flushed as row groups: bounds peak RSS
# independently of the input size.
_BUFFERED_ROWS_BUDGET = 200_000
_MIN_ROWS_PER_GROUP = 2_048  # smaller row groups make Parquet's per-group overhead dominate
_READ_CHUNK_BYTES = 1 << 20


class HNCFormatError(DataFormatError):
    """An HNC JSON file breaks the documented format; the message names the file, image and caption."""


class PairTableError(DataFormatError):
    """A pair table (shard or DataFrame) is malformed; the message names the source and the record."""


class Pair(NamedTuple):
    """One positive/hard-negative caption pair of an image (captions already stripped)."""

    positive: str
    negative: str
    type: str
    positive_id: str
    negative_id: str


class _Caption(NamedTuple):
    text: str
    label: int
    type: str


@dataclass
class PairStats:
    """Counts gathered while reading one HNC file; becomes ``stats.json``."""

    shape: str | None = None
    input_sha256: str | None = None
    input_bytes: int = 0
    images_read: int = 0
    images_with_pairs: int = 0
    pairs_per_type: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    positives_without_negative: int = 0
    missing_images: list[str] = field(default_factory=list)
    test_captions_skipped: Counter = field(default_factory=Counter)
    test_pairs_reversed: int = 0  # stored (negative, positive)
    test_type_spellings: Counter = field(default_factory=Counter)  # "written → read as" for names read leniently

    def pairs_per_group(self) -> dict[str, int]:
        groups: Counter = Counter()
        for type_name, count in self.pairs_per_type.items():
            groups[type_group(type_name)] += count
        return {group: groups[group] for group in GROUPS if groups[group]}

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "images_read": self.images_read,
            "images": self.images_with_pairs,
            "pairs": sum(self.pairs_per_type.values()),
            "pairs_per_type": dict(sorted(self.pairs_per_type.items())),
            "pairs_per_group": self.pairs_per_group(),
            "dropped": {reason: self.dropped[reason] for reason in DROP_REASONS},
            "positives_without_negative": self.positives_without_negative,
            "missing_images": sorted(self.missing_images),
            **({"test_captions_skipped": {r: self.test_captions_skipped[r] for r in TEST_SKIP_REASONS},
                "test_pairs_reversed": self.test_pairs_reversed,
                "test_type_spellings": dict(sorted(self.test_type_spellings.items()))}
               if self.shape == SHAPE_TEST else {}),
        }


def type_group(type_name: str) -> str:
    """The coarse group (attribute / relation / counting / logic) of a train/val or test type name."""
    try:
        return _GROUP_OF[type_name]
    except KeyError:
        raise KeyError(f"unknown HNC type {type_name!r}") from None


def shard_of(image_id: str, n_shards: int) -> int:
    """The shard that holds every pair of ``image_id``: a hash that is stable across runs and machines.

    (Python's ``hash`` of a str is salted per process, so it would scatter an image differently each run.)
    """
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_shards


def pair_schema(with_image_path: bool = False) -> pa.Schema:
    """The explicit Arrow schema of a pair table (and of every shard)."""
    fields = [pa.field(name, pa.string(), nullable=False) for name in PAIR_COLUMNS]
    if with_image_path:
        fields.append(pa.field("image_path", pa.string(), nullable=False))
    return pa.schema(fields)


# --------------------------------------------------------------------------------------------------------
# Streaming the JSON


class _HashingReader:
    """A binary file wrapper that hashes and counts every byte the parser reads, so the input's sha256
    comes out of the same single pass (an 8 GB file is not read twice)."""

    def __init__(self, handle, progress: tqdm | None) -> None:
        self._handle = handle
        self._progress = progress
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self.sha256.update(chunk)
        self.bytes_read += len(chunk)
        if self._progress is not None:
            self._progress.update(len(chunk))
        return chunk


def _check_starts_with_object(path: Path) -> None:
    """``kvitems(f, "")`` silently yields nothing for a top-level array; refuse it up front instead."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith(b"{"):
        what = "is empty" if not head else f"starts with {head[:20]!r}"
        raise HNCFormatError(f"{path}: malformed HNC JSON: expected a top-level object, but the file {what}")


def _iter_top_level(path: Path, reader: _HashingReader) -> Iterator[tuple[str, Any]]:
    """(top-level key, parsed value) pairs, with ijson's errors turned into :class:`HNCFormatError`."""
    last_key = None
    try:
        for key, value in ijson.kvitems(reader, "", use_float=True, buf_size=_READ_CHUNK_BYTES):
            last_key = key
            yield key, value
    except ijson.JSONError as error:
        where = f"after image {last_key!r}" if last_key is not None else "before the first image"
        reason = str(error).strip()
        if "UTF8" in reason or "UTF-8" in reason:
            reason = f"bytes that are not valid UTF-8 ({reason.splitlines()[0]})"
        raise HNCFormatError(
            f"{path}: malformed JSON {where} (within the first {reader.bytes_read:,} bytes): {reason}"
        ) from error


# --------------------------------------------------------------------------------------------------------
# One image's entry → its pairs


def _record_location(path: Path, image_id: str, caption_id: str) -> str:
    return f"{path}: image {image_id!r}, caption {caption_id!r}"


def _checked_caption(path: Path, image_id: str, caption_id: str, record: Any) -> _Caption:
    """A caption record, validated; errors name file, image and caption.

    The common case is checked in one cheap expression (this runs ~16 M times on the train file); only a
    record that fails it is diagnosed field by field.
    """
    try:
        text, label, type_name = record["caption"].strip(), record["label"], record["type"]
    except (TypeError, KeyError, AttributeError):
        _raise_caption_error(path, image_id, caption_id, record)
    # bool is an int subclass: `type(...) is int` refuses true/false too.
    if text and type(label) is int and (label == 0 or label == 1) and type(type_name) is str and type_name in _GROUP_OF:
        return _Caption(text, label, type_name)
    _raise_caption_error(path, image_id, caption_id, record)


def _raise_caption_error(path: Path, image_id: str, caption_id: str, record: Any) -> NoReturn:
    """Say exactly what is wrong with a caption record that failed the fast check."""
    where = _record_location(path, image_id, caption_id)
    if not isinstance(record, dict):
        raise HNCFormatError(f"{where}: expected a caption record (object), got {type(record).__name__}")
    for key in ("caption", "label", "type"):
        if key not in record:
            raise HNCFormatError(f"{where}: record has no {key!r} field")
    caption, label, type_name = record["caption"], record["label"], record["type"]
    if not isinstance(caption, str):
        raise HNCFormatError(f"{where}: 'caption' must be a string, got {caption!r}")
    if not caption.strip():
        raise HNCFormatError(f"{where}: empty caption {caption!r}")
    if type(label) is not int or label not in (0, 1):
        raise HNCFormatError(f"{where}: 'label' must be 0 (hard negative) or 1 (positive), got {label!r}")
    raise HNCFormatError(f"{where}: unknown type {type_name!r} (known: {sorted(_GROUP_OF)})")


def _positive_key(link: Any) -> str | None:
    """``cpt_p_id`` is an int in the file while caption ids are string keys: compare as strings."""
    if type(link) is int or type(link) is str:
        return str(link)
    if type(link) is float and link.is_integer():
        return str(int(link))
    return None  # null (a negative without its positive) or garbage: reported by the caller


def pairs_of_train_val_image(path: Path, image_id: str, captions: dict) -> tuple[list[Pair], int]:
    """Pairs of one train/val image (negatives linked to positives by ``cpt_p_id``), in file order.

    Returns the pairs and the number of positives that no negative points to.
    """
    checked = {cid: _checked_caption(path, image_id, cid, rec) for cid, rec in captions.items()}
    pairs: list[Pair] = []
    linked_positives: set[str] = set()
    for caption_id, negative in checked.items():
        if negative.label == 1:
            continue
        link = captions[caption_id].get("cpt_p_id")
        positive_id = _positive_key(link)
        positive = checked.get(positive_id) if positive_id is not None else None
        if positive is None or positive.label != 1:
            _raise_link_error(path, image_id, caption_id, link, positive)
        pairs.append(Pair(positive.text, negative.text, negative.type, positive_id, caption_id))
        linked_positives.add(positive_id)
    n_positives = sum(1 for caption in checked.values() if caption.label == 1)
    return pairs, n_positives - len(linked_positives)


def _raise_link_error(path: Path, image_id: str, caption_id: str, link: Any, target: _Caption | None) -> NoReturn:
    where = _record_location(path, image_id, caption_id)
    if link is None:
        raise HNCFormatError(f"{where}: hard negative without 'cpt_p_id' (the id of its positive)")
    if target is None:
        raise HNCFormatError(f"{where}: cpt_p_id {link!r} names no caption of this image: the negative has no positive")
    raise HNCFormatError(f"{where}: cpt_p_id {link!r} names caption {_positive_key(link)!r}, which is not a positive")


def test_type_name(written: Any) -> str | None:
    """A test type name as read: stripped, lower case, spaces and hyphens as underscores; None if not a string."""
    if not isinstance(written, str):
        return None
    return re.sub(r"[\s-]+", "_", written.strip().lower())


def _test_caption(image_id: str, caption_id: str, record: Any, stats: PairStats) -> _Caption | None:
    """A test caption read leniently (the file is hand-annotated): whitespace collapsed, labels 0/1 as numbers or
    strings, type names in any case or spacing. A record that still makes no caption is counted, not raised."""
    if not isinstance(record, dict):
        stats.test_captions_skipped["not_a_record"] += 1
        return None
    text = " ".join(record["caption"].split()) if isinstance(record.get("caption"), str) else ""
    label = record.get("label")
    label = {"0": 0, "1": 1}.get(label.strip(), label) if isinstance(label, str) else label
    type_name = test_type_name(record.get("type"))
    reason = ("empty_caption" if not text else "bad_label" if type(label) is not int or label not in (0, 1)
              else "unknown_type" if type_name not in _GROUP_OF else None)
    if reason is not None:
        stats.test_captions_skipped[reason] += 1
        log.warning("HNC test image %r, caption %r: skipped (%s): %r", image_id, caption_id, reason, record)
        return None
    if type_name != record["type"]:
        stats.test_type_spellings[f"{record['type']!r} → {type_name}"] += 1
    return _Caption(text, label, type_name)


def pairs_of_test_image(path: Path, image_id: str, records: dict, stats: PairStats) -> list[Pair]:
    """Pairs of one test image: captions of consecutive ids, in numeric id order, with opposite labels and the
    same type, written (positive, negative) or, counted, (negative, positive).

    A caption that has no such neighbour is counted as unpaired and the walk goes on from the next one, so an
    orphan costs only itself; nothing is paired across another caption.
    """
    try:
        ordered_ids = sorted(records, key=int)
    except ValueError:
        raise HNCFormatError(
            f"{path}: image {image_id!r}: test caption ids must be integers, got {sorted(records)!r}"
        ) from None
    captions = [(cid, caption) for cid in ordered_ids
                if (caption := _test_caption(image_id, cid, records[cid], stats)) is not None]
    pairs, i = [], 0
    while i < len(captions):
        (first_id, first), (second_id, second) = captions[i], captions[i + 1] if i + 1 < len(captions) else (None, None)
        if second is None or first.label == second.label or first.type != second.type:
            stats.test_captions_skipped["unpaired"] += 1
            log.warning("HNC test image %r, caption %r: no partner of the opposite label and the same type next to "
                        "it; skipped", image_id, first_id)
            i += 1
            continue
        if first.label == 0:
            stats.test_pairs_reversed += 1
            (first_id, first), (second_id, second) = (second_id, second), (first_id, first)
        pairs.append(Pair(first.text, second.text, first.type, first_id, second_id))
        i += 2
    return pairs


def entry_shape(path: Path, image_key: str, value: Any) -> str:
    """Which of HNC's two shapes one top-level entry has."""
    if not isinstance(value, dict):
        raise HNCFormatError(f"{path}: image {image_key!r}: expected an object, got {type(value).__name__}")
    if "captions" in value:
        if not isinstance(value["captions"], dict):
            raise HNCFormatError(f"{path}: image {image_key!r}: 'captions' must be an object")
        return SHAPE_TRAIN_VAL
    return SHAPE_TEST


def drop_degenerate_pairs(pairs: list[Pair], dropped: Counter) -> list[Pair]:
    """Drop pairs whose captions are identical (after strip + lower-case) and repeats within one image.

    Both defects occur in the real train/val files; ``dropped`` counts them by reason.
    """
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in pairs:
        key = (pair.positive.lower(), pair.negative.lower())
        if key[0] == key[1]:
            dropped["identical_pair"] += 1
        elif key in seen:
            dropped["duplicate_pair"] += 1
        else:
            seen.add(key)
            kept.append(pair)
    return kept


class ImagePairs(NamedTuple):
    image_id: str
    pairs: list[Pair]
    image_path: str | None


def iter_image_pairs(
    json_path: str | os.PathLike,
    stats: PairStats,
    *,
    images_dir: str | os.PathLike | None = None,
    on_missing_image: OnMissingImage = "error",
    progress: bool = True,
) -> Iterator[ImagePairs]:
    """Stream an HNC file of either shape, one image at a time, as cleaned pairs.

    ``stats`` is filled in as the stream goes; ``input_sha256`` and ``input_bytes`` once it is exhausted.
    Images without a pair left after cleaning are not yielded.
    """
    path = Path(json_path)
    check_on_missing_image(on_missing_image)
    images_dir = check_images_dir(images_dir) if images_dir is not None else None
    _check_starts_with_object(path)
    seen_images: set[str] = set()
    with open(path, "rb") as handle, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"HNC {path.name}",
        disable=not progress, mininterval=5.0,
    ) as bar:
        reader = _HashingReader(handle, bar)
        for image_key, value in _iter_top_level(path, reader):
            image_id = image_key.removesuffix(".jpg")
            if image_id in seen_images:
                raise HNCFormatError(f"{path}: image {image_id!r} appears twice at the top level")
            seen_images.add(image_id)
            pairs = drop_degenerate_pairs(_pairs_of_entry(path, image_key, image_id, value, stats), stats.dropped)
            image_path = None
            if images_dir is not None:
                image_path = str(images_dir / f"{image_id}.jpg")
                if missing_image_files([image_path], referenced_by=path, on_missing_image=on_missing_image):
                    stats.missing_images.append(Path(image_path).name)
                    stats.dropped["missing_image"] += len(pairs)
                    continue
            if pairs:
                stats.images_with_pairs += 1
                stats.pairs_per_type.update(pair.type for pair in pairs)
                yield ImagePairs(image_id, pairs, image_path)
    stats.input_sha256 = reader.sha256.hexdigest()
    stats.input_bytes = reader.bytes_read
    _log_summary(path, stats)
    if stats.shape == SHAPE_TEST and not stats.pairs_per_type and sum(stats.test_captions_skipped.values()):
        raise HNCFormatError(f"{path}: no test pair could be read (captions skipped: "
                             f"{dict(stats.test_captions_skipped)}); is this an HNC test file?")


def _pairs_of_entry(path: Path, image_key: str, image_id: str, value: Any, stats: PairStats) -> list[Pair]:
    """The raw pairs of one top-level entry, after checking it has the same shape as the file's first."""
    shape = entry_shape(path, image_key, value)
    if stats.shape is None:
        stats.shape = shape
    elif shape != stats.shape:
        raise HNCFormatError(
            f"{path}: image {image_key!r} has the {shape} shape, earlier images the {stats.shape} shape"
        )
    stats.images_read += 1
    if shape == SHAPE_TEST:
        return pairs_of_test_image(path, image_id, value, stats)
    pairs, unlinked = pairs_of_train_val_image(path, image_id, value["captions"])
    stats.positives_without_negative += unlinked
    return pairs


def _log_summary(path: Path, stats: PairStats) -> None:
    summary = stats.as_dict()
    log.info(
        "%s: %d images, %d pairs kept; dropped %s; %d positives without a negative",
        path, summary["images"], summary["pairs"], summary["dropped"], summary["positives_without_negative"],
    )
    if stats.shape == SHAPE_TEST:
        log.info("%s: test captions skipped %s; pairs stored (negative, positive): %d; type names read leniently: %s",
                 path, summary["test_captions_skipped"], summary["test_pairs_reversed"], summary["test_type_spellings"])


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while streaming.

    Parsing allocates millions of short-lived dicts, which keeps triggering collections that rescan the
    (acyclic) pair tuples waiting in the shard buffers; measured here that was 25-40 % of the run time.
    Nothing built while streaming forms a cycle, so reference counting still frees every image's record
    as soon as the next one replaces it, and memory stays bounded.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------------------
# Columnar output


class _PairBuffer:
    """Pairs of one shard (or of the whole table) held as tuples until they become an Arrow table.

    Whole images are appended (``list.extend``) and turned into columns only at flush time with
    ``zip(*rows)``: both run in C, which matters at 8 M pairs.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.with_image_path = "image_path" in schema.names
        self._clear()

    def _clear(self) -> None:
        self.pairs: list[Pair] = []
        self.image_ids: list[str] = []
        self.image_paths: list[str | None] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, image: ImagePairs) -> None:
        n = len(image.pairs)
        self.pairs.extend(image.pairs)
        self.image_ids.extend([image.image_id] * n)
        if self.with_image_path:
            self.image_paths.extend([image.image_path] * n)

    def take_table(self) -> pa.Table:
        positive, negative, types, positive_id, negative_id = zip(*self.pairs) if self.pairs else ([],) * 5
        columns = {
            "image_id": self.image_ids,
            "positive": positive,
            "negative": negative,
            "type": types,
            "type_group": [_GROUP_OF[type_name] for type_name in types],
            "positive_id": positive_id,
            "negative_id": negative_id,
        }
        if self.with_image_path:
            columns["image_path"] = self.image_paths
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self._clear()
        return table


def read_pairs(
    path: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    on_missing_image: OnMissingImage = "error",
    progress: bool = False,
) -> pd.DataFrame:
    """All cleaned pairs of an HNC file (either shape) as a DataFrame.

    Columns: ``image_id`` (no ``.jpg``), ``positive``, ``negative`` (stripped), ``type`` (HNC's type name),
    ``type_group`` (attribute / relation / counting / logic), ``positive_id``, ``negative_id`` (caption ids
    as in the file), plus ``image_path`` when ``images_dir`` is given. Rows are in file order. The counts
    (dropped pairs by reason, pairs per type …) are in ``df.attrs["stats"]``.

    Meant for the val/test files and tests; the train file goes through :func:`write_pair_shards`.
    """
    stats = PairStats()
    buffer = _PairBuffer(pair_schema(images_dir is not None))
    with _cyclic_gc_paused():
        for image in iter_image_pairs(
            path, stats, images_dir=images_dir, on_missing_image=on_missing_image, progress=progress
        ):
            buffer.add(image)
    frame = buffer.take_table().to_pandas()
    frame.attrs["stats"] = stats.as_dict()
    return frame


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def write_pair_shards(
    json_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    n_shards: int,
    images_dir: str | os.PathLike | None = None,
    on_missing_image: OnMissingImage = "error",
    progress: bool = True,
) -> dict[str, Any]:
    """Stream an HNC file into ``out_dir/part-{k:05d}.parquet`` (k < n_shards) and ``out_dir/stats.json``.

    Every pair of an image lands in shard :func:`shard_of` (image_id); every shard is written, even when
    empty. Memory stays bounded whatever the input size: the JSON is parsed one image at a time and shard
    buffers are flushed as zstd row groups. The output is atomic: everything is written into a temporary
    sibling directory (``stats.json`` last) that replaces ``out_dir`` only when the whole file went
    through, so a failed run leaves no shard behind. Returns the stats dict.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    json_path, out_dir = Path(json_path), Path(out_dir)
    schema = pair_schema(images_dir is not None)
    stats = PairStats()
    with atomic_dir(out_dir) as tmp_dir:
        with contextlib.ExitStack() as open_shards, _cyclic_gc_paused():
            writers = [
                open_shards.enter_context(pq.ParquetWriter(tmp_dir / shard_name(k), schema, compression="zstd"))
                for k in range(n_shards)
            ]
            images = iter_image_pairs(
                json_path, stats, images_dir=images_dir, on_missing_image=on_missing_image, progress=progress
            )
            rows_per_shard = _route_to_shards(images, writers, schema)
        result = _shard_stats(json_path, out_dir, stats, n_shards, rows_per_shard, images_dir)
        write_json(tmp_dir / "stats.json", result)  # last: its presence means the shards are complete
    return result


def _route_to_shards(images: Iterator[ImagePairs], writers: list[pq.ParquetWriter], schema: pa.Schema) -> list[int]:
    """Append each image's pairs to its shard's buffer, flushing a buffer as a row group when it is full."""
    n_shards = len(writers)
    rows_per_group = max(_MIN_ROWS_PER_GROUP, _BUFFERED_ROWS_BUDGET // n_shards)
    buffers = [_PairBuffer(schema) for _ in range(n_shards)]
    rows_per_shard = [0] * n_shards
    for image in images:
        k = shard_of(image.image_id, n_shards)
        buffers[k].add(image)
        rows_per_shard[k] += len(image.pairs)
        if len(buffers[k]) >= rows_per_group:
            writers[k].write_table(buffers[k].take_table())
    for writer, buffer in zip(writers, buffers):
        if len(buffer):
            writer.write_table(buffer.take_table())
    return rows_per_shard


def _shard_stats(
    json_path: Path,
    out_dir: Path,
    stats: PairStats,
    n_shards: int,
    rows_per_shard: list[int],
    images_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    return {
        "input": str(json_path),
        "input_sha256": stats.input_sha256,
        "input_bytes": stats.input_bytes,
        "images_dir": None if images_dir is None else str(images_dir),
        "n_shards": n_shards,
        "shards": [shard_name(k) for k in range(n_shards)],
        "pairs_per_shard": rows_per_shard,
        **stats.as_dict(),
        "provenance": provenance(inputs=[json_path], output=str(out_dir)),
    }


def read_pair_tables(
    paths: Sequence[str | os.PathLike], *, columns: Sequence[str] | None = None, required: Sequence[str] = (),
) -> pd.DataFrame:
    """The pairs of the given shard files, in order: the one reader of the shards for every stage.

    ``columns`` selects what is read (None = every column); each shard must hold ``required`` and ``columns``, else
    ``PairTableError`` names it. Arrow's memory pool is handed back afterwards: decoding 8.2 M pairs leaves GBs in it.
    """
    wanted = list(dict.fromkeys([*(columns or ()), *required]))
    tables = []
    for path in paths:
        names = pq.read_schema(path).names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise PairTableError(f"{path} lacks columns {missing}; has {names}")
        tables.append(pq.read_table(path, columns=list(columns) if columns is not None else None))
    if not tables:
        raise PairTableError("no pair shards given")
    frame = pa.concat_tables(tables).to_pandas()
    del tables
    pa.default_memory_pool().release_unused()
    return frame


def read_pair_shards(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The pairs of a shard directory written by :func:`write_pair_shards`, shard after shard.

    Refuses a directory without ``stats.json`` (not a finished conversion) or with missing shards.
    """
    out_dir = Path(out_dir)
    stats_path = out_dir / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no stats.json: not a finished HNC shard directory")
    stats = json.loads(stats_path.read_text())
    shard_paths = [out_dir / name for name in stats["shards"]]
    absent = [p.name for p in shard_paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{out_dir}: shards listed in stats.json are missing: {absent}")
    frame = read_pair_tables(shard_paths)
    frame.attrs["stats"] = {k: v for k, v in stats.items() if k != "provenance"}
    return frame
