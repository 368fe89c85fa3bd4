"""A scale-rehearsal world: the real datasets' file formats and image sizes at a chosen fraction of their counts.

The demo world (``hnclip.synth``) is small on purpose: 64 px scenes and a few thousand captions. This one exists
to run the real, non-demo path of the pipeline on one machine and measure it at two sizes, so what matters is that
every file has the real format, every image the real size and weight on disk, and every count a known fraction of
the real one. Files under ``out_dir``, with the config key of ``paths`` each stands in for::

    gqa/images/<image_id>.jpg                          gqa_images          GQA-size JPEGs (train, val, test images)
    hnc/hnc_clean_strict_{train,val,test}.json         hnc_<split>         HNC's two JSON shapes (hnclip.data.hnc)
    vqav2/v2_OpenEnded_mscoco_val2014_questions.json   vqav2_questions
    vqav2/v2_mscoco_val2014_annotations.json           vqav2_annotations   ten answers per question
    vqav2/val2014/COCO_val2014_<id:012d>.jpg           vqav2_images        COCO-size JPEGs
    textvqa/TextVQA_0.5.1_val.json                     textvqa_questions
    textvqa/TextVQA_Rosetta_OCR_v0.2_val.json          textvqa_ocr         one OCR entry per image
    textvqa/train_images/<image_id>.jpg                textvqa_images      Open Images-size JPEGs, words drawn on
    world.json                                         (none)              counts, bytes and the paths above

A count is ``max(floor, round(fraction x real count))``; HNC test keeps at least 20 images. Pixels and captions are
unrelated (a caption names no drawn shape): the rehearsal measures time and memory, not accuracy. Images are smooth
colour fields with grain and a few shapes, so a JPEG weighs what a photo of its size does rather than the few kB of
a flat one. Captions are template sentences whose negative replaces one slot, never identical to the positive and
never repeated within an image, so the reader keeps every pair.

Every item draws from its own seeded stream, so a world is byte-identical for a seed, and the JSON files are
streamed record by record (at fraction 0.1 the train file holds 820 k pairs). Everything is written into a staging
directory beside ``out_dir`` that replaces it only when complete: an interrupted run leaves no half world.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import hnclip
from hnclip.data.hnc import TEST_TYPE_EQUIVALENTS, TYPE_GROUPS
from hnclip.io import atomic_dir, write_json
from hnclip.synth.textvqa import TextQuestion, fake_flickr_urls, image_classes, question_tokens
from hnclip.synth.textvqa import annotator_answers as textvqa_annotator_answers
from hnclip.synth.vqa import VqaQuestion, annotator_answers, most_common_answer
from hnclip.synth.writers import (
    JsonArrayDocumentStream,
    JsonObjectStream,
    rosetta_head,
    textvqa_head,
    vqa_annotations_head,
    vqa_questions_head,
)

log = logging.getLogger(__name__)

WORLD_FORMAT_VERSION = 1
LOG_EVERY_IMAGES = 1000

#: The released files' counts (HNC clean-strict, VQA v2 val2014, TextVQA 0.5.1 val).
REAL_COUNTS: dict[str, dict[str, int]] = {
    "hnc_train": {"images": 67_807, "pairs": 8_208_196},
    "hnc_val": {"images": 9_693, "pairs": 1_157_416},
    "hnc_test": {"images": 100, "pairs": 872},
    "vqav2": {"images": 40_504, "questions": 214_354},
    "textvqa": {"images": 3_166, "questions": 5_000},
}
# Below these a split is too small to exercise sharding, batching or stratified subsampling at all.
FLOORS = {"hnc_train": 8, "hnc_val": 4, "hnc_test": 20, "vqav2_questions": 16, "textvqa_questions": 8}
TEST_PAIRS_PER_IMAGE = 9  # 872 pairs / 100 images

# (width, height) and weight: GQA images are mostly 500 px on the long side, COCO's 640, Open Images' (TextVQA) 1024.
GQA_SIZES = (((500, 375), 5), ((500, 333), 3), ((375, 500), 2), ((500, 281), 1), ((333, 500), 1), ((640, 480), 1))
COCO_SIZES = (((640, 480), 6), ((640, 427), 3), ((480, 640), 2), ((640, 360), 1), ((427, 640), 1))
TEXTVQA_SIZES = (((1024, 768), 5), ((1024, 683), 3), ((768, 1024), 2), ((1024, 576), 1))
JPEG_QUALITY = 90
GRAIN = 16  # ± per-pixel grain: what makes a 500x375 JPEG weigh ~60 kB like a photo instead of ~30 kB

# Distinct codes for the seeded stream of each kind of item.
_STREAMS = {"hnc_train": 1, "hnc_val": 2, "hnc_test": 3, "vqav2": 4, "textvqa": 5}


# ------------------------------------------------------------------ counts


@dataclass(frozen=True)
class WorldCounts:
    """How many of each thing a world of a given fraction holds."""

    train_images: int
    val_images: int
    test_images: int
    vqa_questions: int
    vqa_images: int
    textvqa_questions: int
    textvqa_images: int


def _scaled(fraction: float, real: int, floor: int) -> int:
    return max(floor, round(fraction * real))


def _capped(count: int, cap: int | None) -> int:
    return count if cap is None else min(count, cap)


def _images_for(questions: int, dataset: str) -> int:
    """Images that carry ``questions`` at the real dataset's questions per image (5.3 VQA v2, 1.6 TextVQA)."""
    real = REAL_COUNTS[dataset]
    return max(1, round(questions * real["images"] / real["questions"]))


def plan_world(fraction: float, max_vqa_questions: int | None = None) -> WorldCounts:
    """The counts of a world at ``fraction`` of the real data (floors and the VQA cap applied)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if max_vqa_questions is not None and max_vqa_questions < 1:
        raise ValueError(f"max_vqa_questions must be >= 1 or None, got {max_vqa_questions}")
    vqa_questions = _capped(
        _scaled(fraction, REAL_COUNTS["vqav2"]["questions"], FLOORS["vqav2_questions"]), max_vqa_questions
    )
    textvqa_questions = _capped(
        _scaled(fraction, REAL_COUNTS["textvqa"]["questions"], FLOORS["textvqa_questions"]), max_vqa_questions
    )
    return WorldCounts(
        train_images=_scaled(fraction, REAL_COUNTS["hnc_train"]["images"], FLOORS["hnc_train"]),
        val_images=_scaled(fraction, REAL_COUNTS["hnc_val"]["images"], FLOORS["hnc_val"]),
        test_images=_scaled(fraction, REAL_COUNTS["hnc_test"]["images"], FLOORS["hnc_test"]),
        vqa_questions=vqa_questions,
        vqa_images=_images_for(vqa_questions, "vqav2"),
        textvqa_questions=textvqa_questions,
        textvqa_images=_images_for(textvqa_questions, "textvqa"),
    )


def _share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible into ``parts``."""
    base, extra = divmod(total, parts)
    return base + (index < extra)


# ------------------------------------------------------------------ random streams


def _item_rngs(seed: int, stream: str, index: int) -> tuple[random.Random, np.random.Generator]:
    """An independent (python, numpy) pair per item: one split's count never changes another split's files."""
    return random.Random(f"rehearsal/{seed}/{stream}/{index}"), np.random.default_rng([seed, _STREAMS[stream], index])


def _weighted_size(rng: random.Random, sizes: tuple) -> tuple[int, int]:
    return rng.choices([size for size, _ in sizes], [weight for _, weight in sizes])[0]


# ------------------------------------------------------------------ images


def photo_like_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with grain and a few outlined shapes: compresses like a photo of that size."""
    coarse = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    texture = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels += (np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), dtype=np.int16) - 128) >> 2
    pixels += rng.integers(-GRAIN, GRAIN + 1, size=(height, width, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_shapes(ImageDraw.Draw(image), rng, width, height)
    return image


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 24)), int(rng.integers(0, height - 24))
        x1 = min(width - 1, x0 + int(rng.integers(16, max(17, width // 2))))
        y1 = min(height - 1, y0 + int(rng.integers(16, max(17, height // 2))))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=fill, outline=(20, 20, 20), width=2)


def save_jpeg(image: Image.Image, path: Path) -> int:
    """Write ``image`` as a quality-90 JPEG (default 4:2:0 chroma, as cameras write); returns its size in bytes."""
    image.save(path, format="JPEG", quality=JPEG_QUALITY)
    return path.stat().st_size


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_word(image: Image.Image, word: str, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Paint ``word`` on a light sign somewhere in ``image``; returns the sign's box normalised to [0, 1]."""
    width, height = image.size
    font = _font(int(rng.integers(24, 72)))
    left, top, right, bottom = font.getbbox(word)
    sign_w, sign_h = right - left + 16, bottom - top + 16
    x, y = int(rng.integers(0, max(1, width - sign_w))), int(rng.integers(0, max(1, height - sign_h)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((x, y, x + sign_w, y + sign_h), fill=(245, 245, 235), outline=(30, 30, 30), width=2)
    draw.text((x + 8 - left, y + 8 - top), word, fill=(15, 15, 15), font=font)
    return x / width, y / height, sign_w / width, sign_h / height


# ------------------------------------------------------------------ captions

NOUNS: dict[str, str] = {  # singular -> plural
    "cup": "cups", "plate": "plates", "table": "tables", "chair": "chairs", "man": "men", "woman": "women",
    "dog": "dogs", "cat": "cats", "car": "cars", "tree": "trees", "window": "windows", "shirt": "shirts",
    "bag": "bags", "bottle": "bottles", "sign": "signs", "building": "buildings", "horse": "horses",
    "bench": "benches", "umbrella": "umbrellas", "lamp": "lamps", "boat": "boats", "bus": "buses",
    "bicycle": "bicycles", "clock": "clocks", "pillow": "pillows", "fence": "fences", "bowl": "bowls",
    "laptop": "laptops", "book": "books", "flower": "flowers", "kite": "kites", "train": "trains",
    "truck": "trucks", "sheep": "sheep", "cow": "cows", "bird": "birds", "helmet": "helmets",
    "jacket": "jackets", "door": "doors", "pole": "poles",
}
ATTRIBUTES = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink", "purple",
              "wooden", "metal", "large", "small", "tall", "short", "striped", "dark", "bright")
RELATIONS = ("to the left of", "to the right of", "on top of", "behind", "in front of", "near", "under", "above",
             "below", "next to", "beside", "on")
NUMBERS = ("two", "three", "four", "five", "six")
COMPARISONS = ("more", "fewer")
OBJECTS_PER_IMAGE = 8

#: Train/val type -> (template, the slot its negative replaces). Slots: nouns s, o, t (plural s_pl, o_pl); their
#: attributes a (of s) and b (of o); relations r, q; a number n; a comparison c.
TEMPLATES: dict[str, tuple[str, str]] = {
    "attribute": ("The {a} {s} is {r} the {o}.", "a"),
    "object": ("There is a {a} {s} {r} the {o}.", "s"),
    "attribute_subg": ("The {s} that is {r} the {o} is {a}.", "a"),
    "relation_subj": ("The {s} is {r} the {o}.", "s"),
    "relation_obj": ("The {s} is {r} the {o}.", "o"),
    "relation_pred": ("The {s} is {r} the {o}.", "r"),
    "relation_attr_subj": ("The {a} {s} is {r} the {b} {o}.", "a"),
    "relation_attr_obj": ("The {a} {s} is {r} the {b} {o}.", "b"),
    "relation_attr_pred": ("The {a} {s} is {r} the {b} {o}.", "r"),
    "obj_count": ("There are {n} {s_pl} in the picture.", "n"),
    "obj_comp_count": ("There are {c} {s_pl} than {o_pl}.", "c"),
    "obj_verify_count": ("There are exactly {n} {s_pl} {r} the {o}.", "n"),
    "obj_verify_count_attr": ("There are exactly {n} {a} {s_pl}.", "n"),
    "and_logic_attr": ("The {s} is {a} and the {o} is {b}.", "b"),
    "and_logic_rel": ("The {s} is {r} the {o} and the {t} is {q} the {o}.", "q"),
    "xor_logic_attr": ("Either the {s} is {a} or the {o} is {b}, but not both.", "a"),
    "xor_logic_rel": ("Either the {s} is {r} the {o} or the {t} is {q} the {o}, but not both.", "r"),
}
TRAIN_TYPES = tuple(TYPE_GROUPS)
TEST_TYPES = tuple(TEST_TYPE_EQUIVALENTS)
_SLOT_CHOICES = {"r": RELATIONS, "q": RELATIONS, "n": NUMBERS, "c": COMPARISONS}
_MAX_DRAWS_PER_PAIR = 50


@dataclass(frozen=True)
class CaptionPair:
    positive: str
    negative: str
    original: str  # HNC's ``replaced``: what the negative replaced, and with what
    replacement: str
    object_ids: tuple[str, ...]  # the image objects the positive names (its ``bboxes``)


@dataclass(frozen=True)
class SceneObject:
    object_id: str
    noun: str
    attribute: str
    box: dict[str, int]


def scene_objects(rng: random.Random, first_id: int, width: int, height: int) -> list[SceneObject]:
    """The image's named objects (distinct nouns): what captions and questions talk about."""
    objects = []
    for k, noun in enumerate(rng.sample(sorted(NOUNS), OBJECTS_PER_IMAGE)):
        w, h = rng.randint(16, width // 2), rng.randint(16, height // 2)
        box = {"x": rng.randint(0, width - w), "y": rng.randint(0, height - h), "w": w, "h": h}
        objects.append(SceneObject(str(first_id + k), noun, rng.choice(ATTRIBUTES), box))
    return objects


class CaptionMaker:
    """Positive/negative caption pairs about one image's objects, none repeated within the image."""

    def __init__(self, objects: list[SceneObject], rng: random.Random) -> None:
        self.objects, self.rng = objects, rng
        self.scene_nouns = {obj.noun for obj in objects}
        self.seen: set[tuple[str, str]] = set()

    def pair(self, type_name: str) -> CaptionPair:
        """A new pair of train type ``type_name`` (redrawn until it differs from every earlier pair)."""
        for _ in range(_MAX_DRAWS_PER_PAIR):
            pair = self._draw(type_name)
            key = (pair.positive.lower(), pair.negative.lower())
            if key not in self.seen:
                self.seen.add(key)
                return pair
        raise RuntimeError(f"no new {type_name!r} caption pair after {_MAX_DRAWS_PER_PAIR} draws")

    def _draw(self, type_name: str) -> CaptionPair:
        template, slot = TEMPLATES[type_name]
        s, o, t = self.rng.sample(self.objects, 3)
        values = {"s": s.noun, "o": o.noun, "t": t.noun, "a": s.attribute, "b": o.attribute,
                  **{name: self.rng.choice(choices) for name, choices in _SLOT_CHOICES.items()}}
        original = values[slot]
        replacement = self._replacement(slot, original)
        negative_values = {**values, slot: replacement}
        named = (s, o, t) if "{t}" in template else (s, o)
        return CaptionPair(_fill(template, values), _fill(template, negative_values), original, replacement,
                           tuple(obj.object_id for obj in named))

    def _replacement(self, slot: str, original: str) -> str:
        """Another value for ``slot``: a noun absent from the image, another attribute, relation, number …"""
        if slot in ("s", "o", "t"):
            choices = [noun for noun in NOUNS if noun not in self.scene_nouns]
        elif slot in ("a", "b"):
            choices = list(ATTRIBUTES)
        else:
            choices = list(_SLOT_CHOICES[slot])
        return self.rng.choice([value for value in choices if value != original])


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values, s_pl=NOUNS[values["s"]], o_pl=NOUNS[values["o"]])


# ------------------------------------------------------------------ HNC records


def _bboxes(objects: dict[str, SceneObject], object_ids: tuple[str, ...]) -> dict[str, dict]:
    return {oid: {"bbox": dict(objects[oid].box), "name": objects[oid].noun} for oid in object_ids}


def hnc_trainval_records(type_name: str, pair: CaptionPair, positive_id: int, bboxes: dict) -> dict[str, dict]:
    """A pair in HNC's train/val shape: the positive (``cpt_p_id`` null) and its negative, ids ``positive_id``, +1."""
    common = {"type": type_name, "textual_label": pair.original, "bboxes": bboxes,
              "ambiguity": {"ambiguous": False}, "noisy": None}
    positive = {"caption": pair.positive, "label": 1, **common, "replaced": None, "cpt_p_id": None}
    negative = {"caption": pair.negative, "label": 0, **common, "replaced": [pair.original, pair.replacement],
                "cpt_p_id": positive_id}
    return {str(positive_id): positive, str(positive_id + 1): negative}


def hnc_test_records(type_name: str, pair: CaptionPair, index: int) -> dict[str, dict]:
    """A pair in HNC's test shape: positional ids 2i (positive) and 2i+1 (negative), no links."""
    return {
        str(2 * index): {"caption": pair.positive, "label": 1, "type": type_name, "replaced": None},
        str(2 * index + 1): {"caption": pair.negative, "label": 0, "type": type_name,
                             "replaced": [pair.original, pair.replacement]},
    }


# ------------------------------------------------------------------ progress


class _Progress:
    """Logs every LOG_EVERY_IMAGES images and at the end, with the rate so far."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.started = label, total, 0, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.done % LOG_EVERY_IMAGES == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            log.info("%s: %d/%d images (%.0f images/s)", self.label, self.done, self.total,
                     self.done / max(elapsed, 1e-9))


# ------------------------------------------------------------------ GQA images + HNC


@dataclass
class SplitTally:
    images: int = 0
    pairs: int = 0
    image_bytes: int = 0

    def add(self, pairs: int, image_bytes: int) -> None:
        self.images, self.pairs, self.image_bytes = self.images + 1, self.pairs + pairs, self.image_bytes + image_bytes


def _gqa_image_ids(seed: int, counts: WorldCounts) -> tuple[list[str], list[str], list[str]]:
    """GQA-like ids: numeric strings (train, val) and "n"-prefixed ones (test), all distinct."""
    rng = random.Random(f"rehearsal/{seed}/ids/gqa")
    numeric = [str(i) for i in rng.sample(range(1, 2_420_000), counts.train_images + counts.val_images)]
    test = [f"n{i}" for i in rng.sample(range(1, 600_000), counts.test_images)]
    return numeric[: counts.train_images], numeric[counts.train_images:], test


def _pair_count(rng: random.Random, mean: int) -> int:
    """Pairs of one image: uniform within ±50 % of ``mean`` (real images differ a lot), so the mean is ``mean``."""
    return rng.randint(mean - mean // 2, mean + mean // 2)


def _gqa_image(
    images_dir: Path, image_id: str, rng: random.Random, np_rng: np.random.Generator
) -> tuple[int, int, int]:
    """Write one GQA image; returns (width, height, bytes)."""
    width, height = _weighted_size(rng, GQA_SIZES)
    size = save_jpeg(photo_like_image(np_rng, width, height), images_dir / f"{image_id}.jpg")
    return width, height, size


def write_gqa_images(images_dir: str | os.PathLike, n: int, *, seed: int = 0) -> list[str]:
    """``n`` GQA-size JPEGs as a rehearsal world's train split has them (same streams), for benchmarks."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        rng, np_rng = _item_rngs(seed, "hnc_train", k)
        _gqa_image(images_dir, f"{k:06d}", rng, np_rng)
        paths.append(str(images_dir / f"{k:06d}.jpg"))
    return paths


def _trainval_captions(objects: list[SceneObject], first_caption_id: int, n_pairs: int, rng: random.Random) -> dict:
    """The ``captions`` object of one train/val image: ``n_pairs`` pairs of random train types."""
    by_id, maker = {obj.object_id: obj for obj in objects}, CaptionMaker(objects, rng)
    records: dict[str, dict] = {}
    for k in range(n_pairs):
        type_name = rng.choice(TRAIN_TYPES)
        pair = maker.pair(type_name)
        bboxes = _bboxes(by_id, pair.object_ids)
        records.update(hnc_trainval_records(type_name, pair, first_caption_id + 2 * k, bboxes))
    return records


def _write_trainval_split(
    root: Path, split: str, image_ids: list[str], seed: int, pairs_per_image: int
) -> SplitTally:
    stream, tally, next_caption_id = f"hnc_{split}", SplitTally(), 0  # caption ids count through the split
    progress = _Progress(f"gqa+hnc {split}", len(image_ids))
    with JsonObjectStream(root / "hnc" / f"hnc_clean_strict_{split}.json") as captions:
        for k, image_id in enumerate(image_ids):
            rng, np_rng = _item_rngs(seed, stream, k)
            width, height, size = _gqa_image(root / "gqa" / "images", image_id, rng, np_rng)
            # GQA object ids are unique across the dataset: derive them from the (unique) image id
            objects = scene_objects(rng, OBJECTS_PER_IMAGE * int(image_id), width, height)
            records = _trainval_captions(objects, next_caption_id, _pair_count(rng, pairs_per_image), rng)
            captions.add(image_id, {"captions": records})
            next_caption_id += len(records)
            tally.add(len(records) // 2, size)
            progress.step()
    return tally


def _write_test_split(root: Path, image_ids: list[str], seed: int) -> SplitTally:
    tally = SplitTally()
    progress = _Progress("gqa+hnc test", len(image_ids))
    with JsonObjectStream(root / "hnc" / "hnc_clean_strict_test.json") as captions:
        for k, image_id in enumerate(image_ids):
            rng, np_rng = _item_rngs(seed, "hnc_test", k)
            width, height, size = _gqa_image(root / "gqa" / "images", image_id, rng, np_rng)
            maker = CaptionMaker(scene_objects(rng, 0, width, height), rng)
            records: dict[str, dict] = {}
            for index in range(_pair_count(rng, TEST_PAIRS_PER_IMAGE)):
                test_type = rng.choice(TEST_TYPES)
                records.update(hnc_test_records(test_type, maker.pair(TEST_TYPE_EQUIVALENTS[test_type]), index))
            captions.add(f"{image_id}.jpg", records)
            tally.add(len(records) // 2, size)
            progress.step()
    return tally


# ------------------------------------------------------------------ VQA v2

# answer type -> its share of VQA v2 val (yes/no 38 %, number 12 %, other 50 %)
VQA_ANSWER_TYPE_WEIGHTS = {"yes/no": 0.38, "number": 0.12, "other": 0.50}
VQA_SUBTYPE = "val2014"


def vqa_question(answer_type: str, objects: list[SceneObject], rng: random.Random) -> VqaQuestion:
    """One question of ``answer_type`` about the image's objects, with its true answer and plausible confusions."""
    target = rng.choice(objects)
    if answer_type == "yes/no":
        asked = rng.choice((target.attribute, rng.choice(ATTRIBUTES)))
        answer = "yes" if asked == target.attribute else "no"
        return VqaQuestion(f"Is the {target.noun} {asked}?", "is the", "yes/no", answer,
                           ("no" if answer == "yes" else "yes",))
    if answer_type == "number":
        count = rng.randint(0, 6)
        wrong = tuple(str(c) for c in (count - 1, count + 1) if c >= 0)
        return VqaQuestion(f"How many {NOUNS[target.noun]} are there?", "how many", "number", str(count), wrong)
    if rng.random() < 0.5:
        wrong = tuple(a for a in ATTRIBUTES if a != target.attribute)[:5]
        return VqaQuestion(f"What color is the {target.noun}?", "what color is the", "other", target.attribute, wrong)
    anchor = rng.choice([obj for obj in objects if obj is not target])
    wrong = tuple(obj.noun for obj in objects if obj is not target)[:4]
    return VqaQuestion(f"What is {rng.choice(RELATIONS)} the {anchor.noun}?", "what is", "other", target.noun, wrong)


def _image_questions(objects: list[SceneObject], n: int, rng: random.Random) -> list[VqaQuestion]:
    """``n`` questions about one image with distinct texts (as an image's questions in VQA v2 are)."""
    types, weights = list(VQA_ANSWER_TYPE_WEIGHTS), list(VQA_ANSWER_TYPE_WEIGHTS.values())
    chosen: dict[str, VqaQuestion] = {}
    for _ in range(_MAX_DRAWS_PER_PAIR * n):
        if len(chosen) == n:
            return list(chosen.values())
        question = vqa_question(rng.choices(types, weights)[0], objects, rng)
        chosen.setdefault(question.question, question)
    raise RuntimeError(f"no {n} distinct questions about one image after {_MAX_DRAWS_PER_PAIR * n} draws")


def _vqa_head(head: dict[str, Any]) -> dict[str, Any]:
    return {**head, "info": {**head["info"], "description": "Scale-rehearsal world in the format of VQA v2 "
                                                            "(hnclip.rehearsal)", "contributor": "hnclip.rehearsal"}}


def _write_vqav2(root: Path, counts: WorldCounts, seed: int) -> dict[str, int]:
    images_dir = root / "vqav2" / VQA_SUBTYPE
    images_dir.mkdir(parents=True)
    coco_ids = random.Random(f"rehearsal/{seed}/ids/coco").sample(range(1, 581_930), counts.vqa_images)
    image_bytes, progress = 0, _Progress("vqav2 val", counts.vqa_images)
    with (
        JsonArrayDocumentStream(root / "vqav2" / f"v2_OpenEnded_mscoco_{VQA_SUBTYPE}_questions.json",
                                _vqa_head(vqa_questions_head(VQA_SUBTYPE)), "questions") as questions,
        JsonArrayDocumentStream(root / "vqav2" / f"v2_mscoco_{VQA_SUBTYPE}_annotations.json",
                                _vqa_head(vqa_annotations_head(VQA_SUBTYPE)), "annotations") as annotations,
    ):
        for k, image_id in enumerate(coco_ids):
            rng, np_rng = _item_rngs(seed, "vqav2", k)
            width, height = _weighted_size(rng, COCO_SIZES)
            image_bytes += save_jpeg(photo_like_image(np_rng, width, height),
                                     images_dir / f"COCO_{VQA_SUBTYPE}_{image_id:012d}.jpg")
            n_questions = _share(counts.vqa_questions, len(coco_ids), k)
            for j, question in enumerate(_image_questions(scene_objects(rng, 0, width, height), n_questions, rng)):
                question_record, annotation = vqa_records(question, image_id, image_id * 1000 + j, rng)
                questions.add(question_record)
                annotations.add(annotation)
            progress.step()
    return {"images": len(coco_ids), "questions": questions.count, "image_bytes": image_bytes}


def vqa_records(question: VqaQuestion, image_id: int, question_id: int, rng: random.Random) -> tuple[dict, dict]:
    """The question record and its annotation (ten answers); ids follow VQA v2's image_id * 1000 + k."""
    answers = annotator_answers(question, rng)
    annotation = {"question_type": question.question_type, "multiple_choice_answer": most_common_answer(answers),
                  "answers": answers, "image_id": image_id, "answer_type": question.answer_type,
                  "question_id": question_id}
    return {"image_id": image_id, "question": question.question, "question_id": question_id}, annotation


# ------------------------------------------------------------------ TextVQA

SIGN_WORDS = ("stop", "exit", "sale", "open", "pepsi", "nike", "adidas", "samsung", "sony", "canon", "apple",
              "google", "heineken", "budweiser", "london", "paris", "main", "street", "cafe", "bar", "pizza", "hotel",
              "taxi", "police", "coca", "cola", "one", "way", "sydney", "boston", "guinness", "nokia", "dell", "hp",
              "2012", "24", "7", "15", "100", "1986", "3", "50")
WORDS_PER_IMAGE = (2, 6)
TEXTVQA_FIRST_QUESTION_ID = 34_602  # where TextVQA 0.5.1 val's question ids start


def textvqa_question(words: list[str], rng: random.Random) -> TextQuestion:
    """A question read off one of the image's words; the other words are what a careless annotator types."""
    answer = rng.choice(words)
    confusions = tuple(word for word in words if word != answer) or (answer[:-1] or "unanswerable",)
    if answer.isdigit():
        template = rng.choice(("what number is on the sign?", "what year is written here?"))
    else:
        template = rng.choice(("what is written on the sign?", "what brand is shown?", "what does the sign say?"))
    return TextQuestion(template, answer, confusions)


def _ocr_entry(image_id: str, words: list[str], boxes: list[tuple[float, float, float, float]]) -> dict:
    """A Rosetta OCR record: the drawn words with their boxes normalised to [0, 1]."""
    return {
        "image_id": image_id,
        "ocr_tokens": list(words),
        "ocr_info": [
            {"word": word, "bounding_box": {"top_left_x": round(x, 6), "top_left_y": round(y, 6),
                                            "width": round(w, 6), "height": round(h, 6), "rotation": 0.0,
                                            "roll": 0.0, "pitch": 0.0, "yaw": 0.0}}
            for word, (x, y, w, h) in zip(words, boxes)
        ],
    }


def _textvqa_item(image_id: str, question_id: int, size: tuple[int, int], question: TextQuestion,
                  rng: random.Random) -> dict:
    original_url, small_url = fake_flickr_urls(rng)
    return {
        "question": question.question, "image_id": image_id, "image_classes": image_classes(rng),
        "flickr_original_url": original_url, "flickr_300k_url": small_url, "image_width": size[0],
        "image_height": size[1], "answers": textvqa_annotator_answers(question, rng),
        "question_tokens": question_tokens(question.question), "question_id": question_id, "set_name": "val",
    }


def _textvqa_image_ids(seed: int, n: int) -> list[str]:
    rng, ids = random.Random(f"rehearsal/{seed}/ids/textvqa"), {}
    while len(ids) < n:
        ids.setdefault(f"{rng.getrandbits(64):016x}", None)
    return list(ids)


def _write_textvqa(root: Path, counts: WorldCounts, seed: int) -> dict[str, int]:
    images_dir = root / "textvqa" / "train_images"
    images_dir.mkdir(parents=True)
    image_ids = _textvqa_image_ids(seed, counts.textvqa_images)
    image_bytes, question_id, progress = 0, TEXTVQA_FIRST_QUESTION_ID, _Progress("textvqa val", len(image_ids))
    with (
        JsonArrayDocumentStream(root / "textvqa" / "TextVQA_0.5.1_val.json", textvqa_head("val"), "data") as data,
        JsonArrayDocumentStream(root / "textvqa" / "TextVQA_Rosetta_OCR_v0.2_val.json", rosetta_head("val"),
                                "data") as ocr,
    ):
        for k, image_id in enumerate(image_ids):
            rng, np_rng = _item_rngs(seed, "textvqa", k)
            size = _weighted_size(rng, TEXTVQA_SIZES)
            image = photo_like_image(np_rng, *size)
            words = rng.sample(SIGN_WORDS, rng.randint(*WORDS_PER_IMAGE))
            boxes = [_draw_word(image, word, np_rng) for word in words]
            image_bytes += save_jpeg(image, images_dir / f"{image_id}.jpg")
            ocr.add(_ocr_entry(image_id, words, boxes))
            for _ in range(_share(counts.textvqa_questions, len(image_ids), k)):
                data.add(_textvqa_item(image_id, question_id, size, textvqa_question(words, rng), rng))
                question_id += 1
            progress.step()
    return {"images": len(image_ids), "questions": data.count, "image_bytes": image_bytes}


# ------------------------------------------------------------------ the world


def world_paths(out_dir: Path) -> dict[str, str]:
    """Config ``paths`` key -> absolute path of its stand-in in the world under ``out_dir``."""
    out_dir = out_dir.resolve()
    relative = {
        "gqa_images": "gqa/images",
        "hnc_train": "hnc/hnc_clean_strict_train.json",
        "hnc_val": "hnc/hnc_clean_strict_val.json",
        "hnc_test": "hnc/hnc_clean_strict_test.json",
        "vqav2_questions": f"vqav2/v2_OpenEnded_mscoco_{VQA_SUBTYPE}_questions.json",
        "vqav2_annotations": f"vqav2/v2_mscoco_{VQA_SUBTYPE}_annotations.json",
        "vqav2_images": f"vqav2/{VQA_SUBTYPE}",
        "textvqa_questions": "textvqa/TextVQA_0.5.1_val.json",
        "textvqa_ocr": "textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
        "textvqa_images": "textvqa/train_images",
    }
    return {key: str(out_dir / path) for key, path in relative.items()}


def _write_gqa_and_hnc(root: Path, counts: WorldCounts, seed: int, pairs_per_image: int) -> dict[str, SplitTally]:
    (root / "gqa" / "images").mkdir(parents=True)
    train_ids, val_ids, test_ids = _gqa_image_ids(seed, counts)
    return {
        "hnc_train": _write_trainval_split(root, "train", train_ids, seed, pairs_per_image),
        "hnc_val": _write_trainval_split(root, "val", val_ids, seed, pairs_per_image),
        "hnc_test": _write_test_split(root, test_ids, seed),
    }


def _json_bytes(root: Path) -> Iterator[tuple[str, int]]:
    for path in sorted(root.glob("*/*.json")):
        yield str(path.relative_to(root)), path.stat().st_size


def write_scale_world(
    out_dir: str | os.PathLike,
    *,
    fraction: float,
    seed: int = 0,
    pairs_per_image: int = 120,
    max_vqa_questions: int | None = None,
) -> dict[str, Any]:
    """Write a rehearsal world of ``fraction`` of the real counts under ``out_dir`` (replacing it); return its summary.

    The summary (also ``out_dir/world.json``) holds the counts per split, the image and JSON bytes, the settings and
    ``paths``: config key -> absolute path, ready to merge into a run's config. ``pairs_per_image`` is the mean pairs
    per HNC train/val image (real: ~121); ``max_vqa_questions`` caps the VQA v2 and TextVQA question counts.
    """
    if pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
    counts, out_dir, started = plan_world(fraction, max_vqa_questions), Path(out_dir), time.perf_counter()
    log.info("rehearsal world at fraction %g into %s: %s", fraction, out_dir, counts)
    with atomic_dir(out_dir) as staging:
        hnc = _write_gqa_and_hnc(staging, counts, seed, pairs_per_image)
        vqav2, textvqa = _write_vqav2(staging, counts, seed), _write_textvqa(staging, counts, seed)
        summary = _summary(staging, out_dir, fraction, seed, pairs_per_image, max_vqa_questions, hnc, vqav2, textvqa)
        summary["write_seconds"] = round(time.perf_counter() - started, 3)
        write_json(staging / "world.json", summary)  # last: its presence means the world is complete
    log.info("rehearsal world written in %.1f s: %s", summary["write_seconds"], summary["counts"])
    return summary


def _summary(staging: Path, out_dir: Path, fraction: float, seed: int, pairs_per_image: int,
             max_vqa_questions: int | None, hnc: dict[str, SplitTally], vqav2: dict, textvqa: dict) -> dict[str, Any]:
    counts = {split: {"images": t.images, "pairs": t.pairs} for split, t in hnc.items()}
    counts["vqav2"] = {"images": vqav2["images"], "questions": vqav2["questions"]}
    counts["textvqa"] = {"images": textvqa["images"], "questions": textvqa["questions"]}
    image_bytes = {"gqa": sum(t.image_bytes for t in hnc.values()), "vqav2": vqav2["image_bytes"],
                   "textvqa": textvqa["image_bytes"]}
    n_images = {"gqa": sum(t.images for t in hnc.values()), "vqav2": vqav2["images"], "textvqa": textvqa["images"]}
    return {
        "generator": "hnclip.rehearsal.world",
        "format_version": WORLD_FORMAT_VERSION,
        "hnclip_version": hnclip.__version__,
        "fraction": fraction,
        "seed": seed,
        "pairs_per_image": pairs_per_image,
        "max_vqa_questions": max_vqa_questions,
        "planned": asdict(plan_world(fraction, max_vqa_questions)),
        "counts": counts,
        "real_counts": REAL_COUNTS,
        "image_bytes": {**image_bytes, "total": sum(image_bytes.values())},
        "mean_image_bytes": {k: round(image_bytes[k] / n_images[k]) for k in image_bytes if n_images[k]},
        "json_bytes": dict(_json_bytes(staging)),
        "paths": world_paths(out_dir),
    }
