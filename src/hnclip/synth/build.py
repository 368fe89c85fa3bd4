"""write_world: the whole synthetic world on disk, in the released datasets' formats.

Everything is built in a staging folder inside ``out_dir`` and moved into place only when complete, one
top-level folder at a time, with ``world.json`` last: a crash never leaves a world that looks finished.
Every image draws from its own seeded random stream, so the files are byte-identical for a given config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

import hnclip
from hnclip.synth.benchmarks import write_compositional_benchmarks
from hnclip.synth.config import WorldConfig
from hnclip.synth.language import claim_mentions
from hnclip.synth.negatives import (
    TEST_TYPE_SOURCES,
    TEST_TYPE_WEIGHTS,
    TRAIN_TYPE_WEIGHTS,
    CaptionPair,
    PairMaker,
    draw_pairs,
)
from hnclip.synth.render import render_scene, render_sign, save_jpeg
from hnclip.synth.textvqa import (
    annotator_answers as text_annotator_answers,
    draw_word,
    fake_flickr_urls,
    image_classes,
    make_question,
    ocr_entry,
    question_tokens,
)
from hnclip.synth.vocabulary import COLOURS, SHAPES, vocabulary_summary
from hnclip.synth.vqa import QuestionMaker, VqaQuestion, annotator_answers, most_common_answer
from hnclip.synth.world import (
    HeldOut,
    HeldOutMode,
    LayoutRules,
    SceneSampler,
    choose_heldout,
    heldout_facts,
    scene_graph_entry,
)
from hnclip.synth.writers import (
    JsonArrayDocumentStream,
    JsonObjectStream,
    hnc_test_records,
    hnc_trainval_records,
    rosetta_head,
    textvqa_head,
    vqa_annotations_head,
    vqa_questions_head,
)

WORLD_FORMAT_VERSION = 1
HAND_TYPED_NO_PERIOD = 0.10  # HNC's test captions were typed by people: some lack the period ...
HAND_TYPED_TRAILING_SPACE = 0.05  # ... or carry stray whitespace
TQDM_OPTIONS: dict[str, Any] = {"mininterval": 2.0, "unit": "img"}


def write_world(out_dir: str | os.PathLike, config: WorldConfig | None = None) -> dict:
    """Write the synthetic world under ``out_dir`` (docs/data.md describes each format) and return its counts."""
    config = config or WorldConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".world-staging-", dir=out_dir))
    try:
        counts = _build(staging, config)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _publish(staging: Path, out_dir: Path) -> None:
    """Move each built folder over its old version; world.json, the completion mark, goes last."""
    entries = sorted(p for p in staging.iterdir() if p.name != "world.json") + [staging / "world.json"]
    for entry in entries:
        target = out_dir / entry.name
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}-old-", dir=out_dir))
            os.replace(target, trash / entry.name)
            os.replace(entry, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(entry, target)


def _build(root: Path, config: WorldConfig) -> dict:
    heldout = choose_heldout(config)
    sampler = SceneSampler(config, heldout)
    gqa_counts, hnc_heldout = _write_gqa_and_hnc(root, config, sampler)
    vqa_counts, vqa_heldout = _write_vqa(root, config, sampler)
    textvqa_counts, textvqa_heldout = _write_textvqa(root, config, heldout)
    zeroshot_counts = _write_zeroshot(root, config, sampler)
    hnc_train_ids, _, _ = _gqa_image_ids(config)
    compositional_counts = write_compositional_benchmarks(root, config, sampler, hnc_train_ids)
    counts = {"gqa_hnc": gqa_counts, "vqav2": vqa_counts, "textvqa": textvqa_counts, "zeroshot": zeroshot_counts,
              "compositional": compositional_counts}
    world = {
        "generator": "hnclip.synth",
        "format_version": WORLD_FORMAT_VERSION,
        "hnclip_version": hnclip.__version__,
        "config": config.to_dict(),
        "vocabulary": vocabulary_summary(),
        "layout": _layout_summary(sampler.rules),
        "heldout": heldout.to_dict(),
        "caption_types": {
            "train_weights": TRAIN_TYPE_WEIGHTS,
            "test_weights": TEST_TYPE_WEIGHTS,
            "test_sources": {k: list(v) for k, v in TEST_TYPE_SOURCES.items()},
        },
        "counts": counts,
        "heldout_images": {"hnc_test": hnc_heldout, "vqav2_val": vqa_heldout, "textvqa_val": textvqa_heldout},
    }
    (root / "world.json").write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
    return counts


def _layout_summary(rules: LayoutRules) -> dict:
    return {
        "image_size": rules.image_size,
        "border_px": rules.border,
        "min_gap_px": rules.gap,
        "small_side_px": list(rules.small_side),
        "large_side_px": list(rules.large_side),
    }


def _item_rng(config: WorldConfig, *path: object) -> random.Random:
    """An independent stream per item: adding images to one split never changes another's."""
    return random.Random("/".join(str(p) for p in (config.seed, *path)))


# ------------------------------------------------------------------ GQA images + HNC captions


@dataclass
class SplitStats:
    images: int = 0
    pairs: int = 0
    by_type: Counter = field(default_factory=Counter)
    duplicate_pairs: int = 0
    images_with_heldout: int = 0
    max_caption_words: int = 0

    def add_pair(self, type_name: str, pair: CaptionPair) -> None:
        self.pairs += 1
        self.by_type[type_name] += 1
        words = max(len(pair.positive.text().split()), len(pair.negative.text().split()))
        self.max_caption_words = max(self.max_caption_words, words)

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "pairs": self.pairs,
            "by_type": dict(sorted(self.by_type.items())),
            "duplicate_pairs": self.duplicate_pairs,
            "images_with_heldout": self.images_with_heldout,
            "max_caption_words": self.max_caption_words,
        }


@dataclass
class _GqaContext:
    config: WorldConfig
    sampler: SceneSampler
    images_dir: Path

    @property
    def rules(self) -> LayoutRules:
        return self.sampler.rules

    @property
    def heldout(self) -> HeldOut:
        return self.sampler.heldout


def _gqa_image_ids(config: WorldConfig) -> tuple[list[str], list[str], list[str]]:
    """GQA-like ids: numeric strings for train/val, "n"-prefixed ones for the test images."""
    rng = _item_rng(config, "gqa", "ids")
    numeric = [str(i) for i in rng.sample(range(1_000_000, 2_500_000), config.n_train + config.n_val)]
    test = [f"n{i}" for i in rng.sample(range(100_000, 1_000_000), config.n_test)]
    return numeric[: config.n_train], numeric[config.n_train :], test


def _object_ids(image_ordinal: int) -> list[str]:
    # GQA object ids are numeric strings unique across the dataset; four slots per image suffice.
    return [str(1_000_000 + 10 * image_ordinal + k) for k in range(4)]


def _write_gqa_and_hnc(root: Path, config: WorldConfig, sampler: SceneSampler) -> tuple[dict, list[str]]:
    train_ids, val_ids, test_ids = _gqa_image_ids(config)
    context = _GqaContext(config, sampler, root / "gqa" / "images")
    context.images_dir.mkdir(parents=True)
    with (
        JsonObjectStream(root / "gqa" / "train_sceneGraphs.json") as graphs,
        JsonObjectStream(root / "hnc" / "hnc_clean_strict_train.json") as captions,
    ):
        train = _write_trainval_split(context, "train", train_ids, 0, graphs, captions)
    with JsonObjectStream(root / "gqa" / "val_sceneGraphs.json") as graphs:
        with JsonObjectStream(root / "hnc" / "hnc_clean_strict_val.json") as captions:
            val = _write_trainval_split(context, "val", val_ids, len(train_ids), graphs, captions)
        with JsonObjectStream(root / "hnc" / "hnc_clean_strict_test.json") as captions:
            test, heldout_ids = _write_test_split(context, test_ids, len(train_ids) + len(val_ids), graphs, captions)
    counts = {"train": train.to_dict(), "val": val.to_dict(), "test": test.to_dict()}
    return counts, heldout_ids


def _write_trainval_split(
    context: _GqaContext,
    split: str,
    image_ids: list[str],
    first_ordinal: int,
    graphs: JsonObjectStream,
    captions: JsonObjectStream,
) -> SplitStats:
    config, stats, next_caption_id = context.config, SplitStats(), 0
    for k, image_id in enumerate(tqdm(image_ids, desc=f"gqa+hnc {split}", **TQDM_OPTIONS)):
        rng = _item_rng(config, "gqa", split, k)
        scene = context.sampler.sample(rng, _object_ids(first_ordinal + k), "exclude")
        entry = scene_graph_entry(scene, context.rules)
        save_jpeg(render_scene(scene), context.images_dir / f"{image_id}.jpg", config.jpeg_quality)
        graphs.add(image_id, entry)
        maker = PairMaker(entry, rng, forbidden=context.heldout)
        pairs = draw_pairs(maker, config.captions_per_image, TRAIN_TYPE_WEIGHTS)
        if pairs and rng.random() < config.duplicate_pair_rate:
            pairs.append(rng.choice(pairs))
            stats.duplicate_pairs += 1
        records: dict[str, dict] = {}
        for type_name, pair in pairs:
            positive_objects = maker.involved_objects(pair.positive)
            negative_objects = maker.involved_objects(pair.positive, pair.negative)
            records.update(
                hnc_trainval_records(type_name, pair, entry, next_caption_id, positive_objects, negative_objects)
            )
            next_caption_id += 2
            stats.add_pair(type_name, pair)
        captions.add(image_id, {"captions": records})
        stats.images += 1
    return stats


def _mentions_heldout(pair: CaptionPair, heldout: HeldOut) -> bool:
    pairs, triples = claim_mentions(pair.positive)
    return bool(pairs & set(heldout.colour_shape) or triples & set(heldout.relation))


def _hand_typed(text: str, rng: random.Random) -> str:
    draw = rng.random()
    if draw < HAND_TYPED_NO_PERIOD:
        return text.rstrip(".")
    if draw < HAND_TYPED_NO_PERIOD + HAND_TYPED_TRAILING_SPACE:
        return text + " "
    return text


def _split_mode(config: WorldConfig, rng: random.Random) -> HeldOutMode:
    return "force" if rng.random() < config.test_heldout_fraction else "natural"


def _write_test_split(
    context: _GqaContext,
    image_ids: list[str],
    first_ordinal: int,
    graphs: JsonObjectStream,
    captions: JsonObjectStream,
) -> tuple[SplitStats, list[str]]:
    config, stats, heldout_ids = context.config, SplitStats(), []
    for k, image_id in enumerate(tqdm(image_ids, desc="gqa+hnc test", **TQDM_OPTIONS)):
        rng = _item_rng(config, "gqa", "test", k)
        scene = context.sampler.sample(rng, _object_ids(first_ordinal + k), _split_mode(config, rng))
        entry = scene_graph_entry(scene, context.rules)
        save_jpeg(render_scene(scene), context.images_dir / f"{image_id}.jpg", config.jpeg_quality)
        graphs.add(image_id, entry)
        shows_heldout = heldout_facts(scene, context.rules, context.heldout).any()
        prefer = (lambda pair: _mentions_heldout(pair, context.heldout)) if shows_heldout else None
        pairs = draw_pairs(
            PairMaker(entry, rng), config.test_captions_per_image, TEST_TYPE_WEIGHTS, TEST_TYPE_SOURCES, prefer
        )
        records: dict[str, dict] = {}
        for index, (type_name, pair) in enumerate(pairs):
            positive, negative = _hand_typed(pair.positive.text(), rng), _hand_typed(pair.negative.text(), rng)
            records.update(hnc_test_records(type_name, pair, index, positive, negative))
            stats.add_pair(type_name, pair)
        captions.add(f"{image_id}.jpg", records)
        stats.images += 1
        if shows_heldout:
            stats.images_with_heldout += 1
            heldout_ids.append(image_id)
    return stats, heldout_ids


# ------------------------------------------------------------------ VQA v2


class _UniqueIds:
    """Distinct random integers from a range, drawn lazily (any count, no precomputed list)."""

    def __init__(self, rng: random.Random, low: int, high: int) -> None:
        self.rng, self.low, self.high, self.used = rng, low, high, set()

    def draw(self) -> int:
        while True:
            value = self.rng.randint(self.low, self.high)
            if value not in self.used:
                self.used.add(value)
                return value


def _write_vqa(root: Path, config: WorldConfig, sampler: SceneSampler) -> tuple[dict, list[int]]:
    image_ids = _UniqueIds(_item_rng(config, "vqa", "ids"), 1, 999_999)
    counts, heldout_ids = {}, []
    for subtype, n_questions in (("train2014", config.n_vqa_train), ("val2014", config.n_vqa_val)):
        stats, split_heldout = _write_vqa_split(root, config, sampler, subtype, n_questions, image_ids)
        counts[subtype] = stats
        heldout_ids.extend(split_heldout)
    return counts, heldout_ids


def _write_vqa_split(
    root: Path, config: WorldConfig, sampler: SceneSampler, subtype: str, n_questions: int, image_ids: _UniqueIds
) -> tuple[dict, list[int]]:
    vqa_dir = root / "vqav2"
    (vqa_dir / subtype).mkdir(parents=True)
    is_train = subtype.startswith("train")
    by_answer_type: Counter = Counter()
    by_question_type: Counter = Counter()
    heldout_ids: list[int] = []
    n_images = n_written = 0  # scenes drawn / images written (a scene with no askable question is skipped)
    questions_path = vqa_dir / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    annotations_path = vqa_dir / f"v2_mscoco_{subtype}_annotations.json"
    progress = tqdm(total=n_questions, desc=f"vqav2 {subtype}", mininterval=2.0, unit="q")
    with (
        JsonArrayDocumentStream(questions_path, vqa_questions_head(subtype), "questions") as questions,
        JsonArrayDocumentStream(annotations_path, vqa_annotations_head(subtype), "annotations") as annotations,
    ):
        while questions.count < n_questions:
            rng = _item_rng(config, "vqa", subtype, n_images)
            mode: HeldOutMode = "exclude" if is_train else _split_mode(config, rng)
            scene = sampler.sample(rng, [str(k) for k in range(4)], mode)
            entry = scene_graph_entry(scene, sampler.rules)
            maker = QuestionMaker(PairMaker(entry, rng, forbidden=sampler.heldout if is_train else None))
            asked = maker.questions(min(config.vqa_questions_per_image, n_questions - questions.count))
            n_images += 1
            if not asked:
                continue
            image_id = image_ids.draw()
            n_written += 1
            save_jpeg(
                render_scene(scene), vqa_dir / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", config.jpeg_quality
            )
            if not is_train and heldout_facts(scene, sampler.rules, sampler.heldout).any():
                heldout_ids.append(image_id)
            for j, question in enumerate(asked):
                question_record, annotation = _vqa_records(question, image_id, image_id * 1000 + j, rng)
                questions.add(question_record)
                annotations.add(annotation)
                by_answer_type[question.answer_type] += 1
                by_question_type[question.question_type] += 1
            progress.update(len(asked))
    progress.close()
    stats = {
        "questions": questions.count,
        "images": n_written,
        "by_answer_type": dict(sorted(by_answer_type.items())),
        "by_question_type": dict(sorted(by_question_type.items())),
        "images_with_heldout": len(heldout_ids),
    }
    return stats, heldout_ids


def _vqa_records(question: VqaQuestion, image_id: int, question_id: int, rng: random.Random) -> tuple[dict, dict]:
    """The question record and its annotation (ten answers); ids follow VQA v2's image_id * 1000 + k."""
    answers = annotator_answers(question, rng)
    annotation = {
        "question_type": question.question_type,
        "multiple_choice_answer": most_common_answer(answers),
        "answers": answers,
        "image_id": image_id,
        "answer_type": question.answer_type,
        "question_id": question_id,
    }
    return {"image_id": image_id, "question": question.question, "question_id": question_id}, annotation


# ------------------------------------------------------------------ TextVQA


def _write_textvqa(root: Path, config: WorldConfig, heldout: HeldOut) -> tuple[dict, list[str]]:
    text_dir = root / "textvqa"
    (text_dir / "train_images").mkdir(parents=True)
    id_rng = _item_rng(config, "textvqa", "ids")
    used_ids: set[str] = set()
    next_question_id = 0
    counts, heldout_ids = {}, []
    for split, n_items in (("train", config.n_textvqa_train), ("val", config.n_textvqa_val)):
        glyph_counts: Counter = Counter()
        with (
            JsonArrayDocumentStream(text_dir / f"TextVQA_0.5.1_{split}.json", textvqa_head(split), "data") as data,
            JsonArrayDocumentStream(
                text_dir / f"TextVQA_Rosetta_OCR_v0.2_{split}.json", rosetta_head(split), "data"
            ) as ocr,
        ):
            for k in tqdm(range(n_items), desc=f"textvqa {split}", **TQDM_OPTIONS):
                rng = _item_rng(config, "textvqa", split, k)
                image_id = _hex_id(id_rng, used_ids)
                word = _textvqa_word(config, heldout, split, rng)
                sign = render_sign(word, config.image_size, rng)
                save_jpeg(sign.image, text_dir / "train_images" / f"{image_id}.jpg", config.jpeg_quality)
                data.add(_textvqa_item(config, split, image_id, word, next_question_id, rng))
                ocr.add(ocr_entry(image_id, word, sign.word_box, config.image_size, rng))
                next_question_id += 1
                glyph_counts[f"{len(word)}_glyph"] += 1
                if split == "val" and word in heldout.textvqa_words:
                    heldout_ids.append(image_id)
        counts[split] = {"questions": n_items, "images": n_items, "by_word_length": dict(sorted(glyph_counts.items()))}
    counts["val"]["images_with_heldout"] = len(heldout_ids)
    return counts, heldout_ids


def _hex_id(rng: random.Random, used: set[str]) -> str:
    while True:
        value = f"{rng.getrandbits(64):016x}"
        if value not in used:
            used.add(value)
            return value


def _textvqa_word(config: WorldConfig, heldout: HeldOut, split: str, rng: random.Random) -> str:
    if split == "train":
        return draw_word(rng, excluded=frozenset(heldout.textvqa_words))
    forced = heldout.textvqa_words if rng.random() < config.test_heldout_fraction else ()
    return draw_word(rng, forced=forced)


def _textvqa_item(
    config: WorldConfig, split: str, image_id: str, word: str, question_id: int, rng: random.Random
) -> dict:
    question = make_question(word, rng)
    original_url, small_url = fake_flickr_urls(rng)
    return {
        "question": question.question,
        "image_id": image_id,
        "image_classes": image_classes(rng),
        "flickr_original_url": original_url,
        "flickr_300k_url": small_url,
        "image_width": config.image_size,
        "image_height": config.image_size,
        "answers": text_annotator_answers(question, rng),
        "question_tokens": question_tokens(question.question),
        "question_id": question_id,
        "set_name": split,
    }


# ------------------------------------------------------------------ zero-shot recognition


def zeroshot_class_names() -> list[str]:
    return [f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES]


def _write_zeroshot(root: Path, config: WorldConfig, sampler: SceneSampler) -> dict:
    classes = zeroshot_class_names()
    total = len(classes) * config.zeroshot_per_class
    with tqdm(total=total, desc="zeroshot", **TQDM_OPTIONS) as progress:
        for name in classes:
            colour, shape = name.split("_")
            folder = root / "zeroshot" / name
            folder.mkdir(parents=True)
            for k in range(config.zeroshot_per_class):
                rng = _item_rng(config, "zeroshot", name, k)
                scene = sampler.single_object_scene(rng, colour, shape, object_id="0")
                save_jpeg(render_scene(scene), folder / f"{k:05d}.jpg", config.jpeg_quality)
                progress.update(1)
    return {"classes": len(classes), "images": total, "per_class": config.zeroshot_per_class}
