"""Streaming JSON writers (one record at a time: a 100 000-image world never sits in memory) and the
per-record formats of GQA, HNC, VQA v2 and TextVQA."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

from hnclip.synth.negatives import CaptionPair

_SEPARATORS = (",", ":")  # compact, like the released files


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=_SEPARATORS, ensure_ascii=False)


class JsonObjectStream:
    """Writes ``{"key": value, ...}`` member by member."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")
        self._handle.write("{")
        self._first = True
        self.count = 0

    def add(self, key: str, value: Any) -> None:
        self._handle.write(("" if self._first else ",") + _dumps(key) + ":" + _dumps(value))
        self._first = False
        self.count += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.write("}")
            self._handle.close()

    def __enter__(self) -> "JsonObjectStream":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class JsonArrayDocumentStream:
    """Writes ``{head..., "<array_key>": [item, ...]}`` item by item (VQA and TextVQA files)."""

    def __init__(self, path: str | os.PathLike, head: dict[str, Any], array_key: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")
        members = "".join(_dumps(k) + ":" + _dumps(v) + "," for k, v in head.items())
        self._handle.write("{" + members + _dumps(array_key) + ":[")
        self._first = True
        self.count = 0

    def add(self, item: Any) -> None:
        self._handle.write(("" if self._first else ",") + _dumps(item))
        self._first = False
        self.count += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.write("]}")
            self._handle.close()

    def __enter__(self) -> "JsonArrayDocumentStream":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# ------------------------------------------------------------------ HNC records


def _bboxes(entry: dict, object_ids: Iterable[str]) -> dict[str, dict]:
    objects = entry["objects"]
    return {
        oid: {
            "bbox": {"x": objects[oid]["x"], "y": objects[oid]["y"], "w": objects[oid]["w"], "h": objects[oid]["h"]},
            "name": objects[oid]["name"],
        }
        for oid in object_ids
    }


def hnc_trainval_records(
    type_name: str,
    pair: CaptionPair,
    entry: dict,
    positive_id: int,
    positive_objects: list[str],
    negative_objects: list[str],
) -> dict[str, dict]:
    """The two records of a pair in HNC's train/val shape: ids ``positive_id`` and ``positive_id + 1``."""
    common = {"type": type_name, "textual_label": pair.original, "ambiguity": {"ambiguous": False}, "noisy": None}
    positive = {
        "caption": pair.positive.text(),
        "label": 1,
        **common,
        "bboxes": _bboxes(entry, positive_objects),
        "replaced": None,
        "cpt_p_id": None,
    }
    negative = {
        "caption": pair.negative.text(),
        "label": 0,
        **common,
        "bboxes": _bboxes(entry, negative_objects),
        "replaced": [pair.original, pair.replacement],
        "cpt_p_id": positive_id,
    }
    return {str(positive_id): _ordered(positive), str(positive_id + 1): _ordered(negative)}


_HNC_FIELD_ORDER = ("caption", "label", "type", "textual_label", "bboxes", "ambiguity", "noisy", "replaced", "cpt_p_id")


def _ordered(record: dict) -> dict:
    return {key: record[key] for key in _HNC_FIELD_ORDER}


def hnc_test_records(type_name: str, pair: CaptionPair, index: int, positive_text: str, negative_text: str) -> dict:
    """A test pair: positional ids 2i (positive) and 2i+1 (negative), no captions wrapper, no cpt_p_id."""
    return {
        str(2 * index): {"caption": positive_text, "label": 1, "type": type_name, "replaced": None},
        str(2 * index + 1): {
            "caption": negative_text,
            "label": 0,
            "type": type_name,
            "replaced": [pair.original, pair.replacement],
        },
    }


# ------------------------------------------------------------------ file heads


def vqa_questions_head(subtype: str) -> dict[str, Any]:
    return {
        "info": _vqa_info(),
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": _vqa_license(),
        "data_subtype": subtype,
    }


def vqa_annotations_head(subtype: str) -> dict[str, Any]:
    return {"info": _vqa_info(), "license": _vqa_license(), "data_subtype": subtype, "data_type": "mscoco"}


def _vqa_info() -> dict[str, Any]:
    return {
        "description": "Synthetic shapes world in the format of VQA v2 (hnclip.synth)",
        "url": "",
        "version": "2.0",
        "year": 2017,
        "contributor": "hnclip.synth",
        "date_created": "2017-04-26 17:07:13",
    }


def _vqa_license() -> dict[str, str]:
    return {"url": "https://opensource.org/licenses/MIT", "name": "MIT"}


def textvqa_head(split: str) -> dict[str, Any]:
    return {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1"}


def rosetta_head(split: str) -> dict[str, Any]:
    return {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.2"}
