"""WorldConfig: every knob of the synthetic world, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MIN_TOTAL_IMAGES = 100
MAX_TOTAL_IMAGES = 100_000


class WorldConfigError(ValueError):
    """A WorldConfig field has a bad value; the message names the field."""


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic world's parameters (all defaulted: the demo's embedded world).

    Counts: ``n_train``/``n_val``/``n_test`` are GQA/HNC images per split; ``n_vqa_*`` and ``n_textvqa_*`` are
    questions (VQA asks ``vqa_questions_per_image`` per image, TextVQA one per image).
    """

    seed: int = 0
    image_size: int = 64
    n_train: int = 6000
    n_val: int = 500
    n_test: int = 500
    n_vqa_train: int = 3000
    n_vqa_val: int = 500
    n_textvqa_train: int = 1500
    n_textvqa_val: int = 300
    zeroshot_per_class: int = 20
    max_objects: int = 3
    # Share of images with exactly two objects; the rest spread evenly over 3..max_objects.
    two_object_fraction: float = 0.65
    # Least gap, as a share of the image side, between two shapes that stand in a spatial relation.
    min_gap: float = 0.07
    # Whether two shapes may be apart on both axes, so that two relations hold at once ("left of" and "above").
    diagonal_pairs: bool = True
    # Positive captions (each with one hard negative) per image in HNC train/val and in HNC test.
    captions_per_image: int = 5
    test_captions_per_image: int = 8
    vqa_questions_per_image: int = 3
    # Held-out combinations: seen only in test splits (HNC test, VQA val, TextVQA val, zeroshot).
    heldout_colour_shape_pairs: int = 2
    heldout_relation_triples: int = 2
    heldout_textvqa_words: int = 2
    # Share of test-split images built around a held-out combination, so generalisation is measurable.
    test_heldout_fraction: float = 0.3
    # HNC train/val defect seen in the real data: a pair repeated within one image (preprocessing drops it).
    duplicate_pair_rate: float = 0.01
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for spec in _INT_RANGES:
            _check_int(self, *spec)
        for name, low, high in _FLOAT_RANGES:
            _check_float(self, name, low, high)
        if not isinstance(self.diagonal_pairs, bool):
            raise WorldConfigError(f"WorldConfig.diagonal_pairs = {self.diagonal_pairs!r} must be true or false")
        total = self.n_train + self.n_val + self.n_test
        if not MIN_TOTAL_IMAGES <= total <= MAX_TOTAL_IMAGES:
            raise WorldConfigError(
                f"n_train + n_val + n_test = {total} must lie in [{MIN_TOTAL_IMAGES}, {MAX_TOTAL_IMAGES}]"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "WorldConfig":
        """Build from a mapping (e.g. the ``synth`` block of the pipeline config); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise WorldConfigError(f"unknown WorldConfig field(s): {', '.join(unknown)}")
        return cls(**values)


# (field, lowest, highest) for the integer fields.
_INT_RANGES: tuple[tuple[str, int, int], ...] = (
    ("seed", 0, 2**63 - 1),
    ("image_size", 32, 1024),
    ("n_train", 1, MAX_TOTAL_IMAGES),
    ("n_val", 1, MAX_TOTAL_IMAGES),
    ("n_test", 1, MAX_TOTAL_IMAGES),
    ("n_vqa_train", 1, 300_000),
    ("n_vqa_val", 1, 300_000),
    ("n_textvqa_train", 1, 300_000),
    ("n_textvqa_val", 1, 300_000),
    ("zeroshot_per_class", 1, 10_000),
    ("max_objects", 2, 4),
    ("captions_per_image", 1, 20),
    ("test_captions_per_image", 1, 20),
    ("vqa_questions_per_image", 1, 6),
    ("heldout_colour_shape_pairs", 0, 5),
    ("heldout_relation_triples", 0, 4),
    ("heldout_textvqa_words", 0, 20),
    ("jpeg_quality", 1, 100),
)
_FLOAT_RANGES: tuple[tuple[str, float, float], ...] = (
    ("two_object_fraction", 0.0, 1.0),
    ("min_gap", 0.02, 0.4),
    ("test_heldout_fraction", 0.0, 1.0),
    ("duplicate_pair_rate", 0.0, 0.5),
)


def _check_int(config: WorldConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    # bool is an int subclass; True as a count is a config mistake, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WorldConfigError(f"WorldConfig.{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise WorldConfigError(f"WorldConfig.{name} = {value} must lie in [{low}, {high}]")


def _check_float(config: WorldConfig, name: str, low: float, high: float) -> None:
    value = getattr(config, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise WorldConfigError(f"WorldConfig.{name} must be a number, got {value!r}")
    if not low <= float(value) <= high:
        raise WorldConfigError(f"WorldConfig.{name} = {value} must lie in [{low}, {high}]")
