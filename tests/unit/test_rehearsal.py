"""The scale-rehearsal world read back by the project's real readers, and the rehearsal LLaVA base's shapes.

One tiny world (fraction 0.0005: 34 train images at 120 pairs each, the floors elsewhere) and one base LLaVA with a
randomly initialised ViT-L-14-336 tower (~25 s, ~5 GB at peak) serve the whole module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image

from hnclip.data.hnc import TEST_TYPE_EQUIVALENTS, TYPE_GROUPS, PairStats, iter_image_pairs, read_pairs
from hnclip.data.vqa import read_textvqa, read_vqav2
from hnclip.rehearsal import world as world_module
from hnclip.rehearsal.world import (
    COCO_SIZES,
    GQA_SIZES,
    REAL_COUNTS,
    TEMPLATES,
    TEXTVQA_SIZES,
    CaptionMaker,
    plan_world,
    scene_objects,
    write_scale_world,
)

FRACTION = 0.0005
PAIRS_PER_IMAGE = 120
MAX_VQA_QUESTIONS = 50
PATH_KEYS = {
    "gqa_images", "hnc_train", "hnc_val", "hnc_test", "vqav2_questions", "vqav2_annotations", "vqav2_images",
    "textvqa_questions", "textvqa_ocr", "textvqa_images",
}
IMAGE_DIR_KEYS = {"gqa_images", "vqav2_images", "textvqa_images"}
REPO = Path(__file__).resolve().parents[2]


def _sizes(table) -> set[tuple[int, int]]:
    return {size for size, _ in table}


def _write(root: Path, seed: int = 0) -> dict:
    return write_scale_world(root, fraction=FRACTION, seed=seed, pairs_per_image=PAIRS_PER_IMAGE,
                             max_vqa_questions=MAX_VQA_QUESTIONS)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rehearsal") / "world"
    return root, _write(root)


# ---------------------------------------------------------------------------------------------------------------
# counts


def test_plan_scales_the_real_counts_with_floors_and_cap():
    tiny = plan_world(FRACTION)
    assert (tiny.train_images, tiny.val_images, tiny.test_images) == (34, 5, 20)  # 33.9, 4.8, floor 20
    assert (tiny.vqa_questions, tiny.vqa_images) == (107, 20)  # 5.3 questions per image, as in VQA v2
    assert (tiny.textvqa_questions, tiny.textvqa_images) == (8, 5)  # floor 8
    full = plan_world(1.0)
    assert (full.train_images, full.val_images, full.test_images) == (67_807, 9_693, 100)
    assert (full.vqa_questions, full.vqa_images) == (214_354, 40_504)
    assert (full.textvqa_questions, full.textvqa_images) == (5_000, 3_166)
    capped = plan_world(0.1, max_vqa_questions=300)
    assert (capped.train_images, capped.vqa_questions, capped.vqa_images) == (6_781, 300, 57)
    assert (capped.textvqa_questions, capped.textvqa_images) == (300, 190)
    with pytest.raises(ValueError, match="fraction"):
        plan_world(0.0)


def test_summary_counts_are_what_was_planned(world):
    root, summary = world
    counts, planned = summary["counts"], plan_world(FRACTION, MAX_VQA_QUESTIONS)
    assert counts["hnc_train"]["images"] == planned.train_images == 34
    assert counts["hnc_val"]["images"] == planned.val_images == 5
    assert counts["hnc_test"]["images"] == planned.test_images == 20
    assert counts["vqav2"] == {"images": planned.vqa_images, "questions": MAX_VQA_QUESTIONS}
    assert counts["textvqa"] == {"images": 5, "questions": 8}
    assert summary["fraction"] == FRACTION and summary["real_counts"] == REAL_COUNTS
    assert json.loads((root / "world.json").read_text()) == summary


# ---------------------------------------------------------------------------------------------------------------
# HNC through the project's reader


def test_hnc_train_reads_back_whole(world):
    root, summary = world
    pairs = read_pairs(root / "hnc" / "hnc_clean_strict_train.json", images_dir=root / "gqa" / "images")
    stats = pairs.attrs["stats"]
    assert stats["shape"] == "train_val"
    assert stats["dropped"] == {"identical_pair": 0, "duplicate_pair": 0, "missing_image": 0}
    assert stats["positives_without_negative"] == 0
    assert len(pairs) == stats["pairs"] == summary["counts"]["hnc_train"]["pairs"]
    per_image = pairs.groupby("image_id").size()
    assert len(per_image) == 34
    assert 110 <= per_image.mean() <= 130  # drawn uniformly within ±50 % of 120
    assert set(pairs["type"]) == set(TYPE_GROUPS)  # all 17 train types at 4 k pairs
    assert (pairs["positive"].str.lower() != pairs["negative"].str.lower()).all()
    assert all(Path(p).is_file() for p in pairs["image_path"].unique())


def test_hnc_val_streams_with_linked_caption_ids(world):
    root, summary = world
    stats = PairStats()
    images = list(iter_image_pairs(root / "hnc" / "hnc_clean_strict_val.json", stats, progress=False))
    assert len(images) == 5 and stats.images_read == 5
    assert sum(len(image.pairs) for image in images) == summary["counts"]["hnc_val"]["pairs"]
    assert sum(stats.dropped.values()) == 0
    for image in images:
        for pair in image.pairs:
            assert int(pair.negative_id) == int(pair.positive_id) + 1


def test_hnc_test_has_the_test_shape_and_types(world):
    root, summary = world
    pairs = read_pairs(root / "hnc" / "hnc_clean_strict_test.json", images_dir=root / "gqa" / "images")
    stats = pairs.attrs["stats"]
    assert stats["shape"] == "test"
    assert sum(stats["dropped"].values()) == 0
    assert len(pairs) == summary["counts"]["hnc_test"]["pairs"]
    assert pairs["image_id"].nunique() == 20 and pairs["image_id"].str.startswith("n").all()
    assert 7 <= pairs.groupby("image_id").size().mean() <= 11  # real: 872 / 100
    assert set(pairs["type"]) <= set(TEST_TYPE_EQUIVALENTS)


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("type_name", sorted(TEMPLATES))
def test_negative_replaces_only_the_named_slot(type_name):
    import random

    rng = random.Random(type_name)
    maker = CaptionMaker(scene_objects(rng, 0, 500, 375), rng)
    for _ in range(30):
        pair = maker.pair(type_name)
        removed, added = _words(pair.positive) - _words(pair.negative), _words(pair.negative) - _words(pair.positive)
        assert removed or added, pair
        assert set(removed) <= set(_words(pair.original)), pair
        assert set(added) <= set(_words(pair.replacement)), pair
    assert len(maker.seen) == 30


# ---------------------------------------------------------------------------------------------------------------
# images


def test_gqa_images_have_gqa_sizes_and_photo_weight(world):
    root, summary = world
    files = sorted((root / "gqa" / "images").glob("*.jpg"))
    assert len(files) == 34 + 5 + 20
    sizes = []
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size in _sizes(GQA_SIZES), (path, image.size)
        sizes.append(path.stat().st_size)
    assert 30_000 <= sum(sizes) / len(sizes) <= 120_000  # a flat-colour image of this size would be ~5 kB
    assert summary["image_bytes"]["gqa"] == sum(sizes)


# ---------------------------------------------------------------------------------------------------------------
# VQA v2 and TextVQA through the project's readers


def test_vqav2_reads_back_with_coco_images(world):
    root, summary = world
    paths = summary["paths"]
    questions = read_vqav2(paths["vqav2_questions"], paths["vqav2_annotations"], paths["vqav2_images"])
    assert len(questions) == MAX_VQA_QUESTIONS
    assert questions["image_id"].nunique() == summary["counts"]["vqav2"]["images"]
    assert questions["answers"].map(len).eq(10).all()
    assert set(questions["answer_type"]) == {"yes/no", "number", "other"}
    assert (questions["question_id"] // 1000 == questions["image_id"].astype(int)).all()
    for path in questions["image_path"].unique():
        with Image.open(path) as image:
            assert image.size in _sizes(COCO_SIZES)


def test_textvqa_reads_back_with_rosetta_ocr(world):
    root, summary = world
    paths = summary["paths"]
    questions = read_textvqa(paths["textvqa_questions"], paths["textvqa_images"], paths["textvqa_ocr"])
    assert len(questions) == 8 and questions["image_id"].nunique() == 5
    assert questions["ocr_source"].eq("rosetta:TextVQA_Rosetta_OCR_v0.2_val.json").all()
    assert questions["ocr_tokens"].map(len).between(2, 6).all()
    # the answer is read off the image: most annotators type one of its OCR tokens
    readable = [row.majority_answer.lower() in set(row.ocr_tokens) for row in questions.itertuples()]
    assert sum(readable) >= 6
    for path in questions["image_path"].unique():
        with Image.open(path) as image:
            assert image.size in _sizes(TEXTVQA_SIZES)


# ---------------------------------------------------------------------------------------------------------------
# paths, determinism, atomicity


def test_paths_are_the_config_keys_and_exist(world):
    root, summary = world
    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    config_keys = set(schema["properties"]["paths"]["properties"])
    assert set(summary["paths"]) == PATH_KEYS and PATH_KEYS <= config_keys
    for key, path in summary["paths"].items():
        path = Path(path)
        assert path.is_absolute() and path.is_relative_to(root.resolve()), key
        assert path.is_dir() if key in IMAGE_DIR_KEYS else path.is_file(), key


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(world, tmp_path):
    root, _ = world
    _write(tmp_path / "again", seed=0)
    assert _digests(tmp_path / "again") == _digests(root)
    _write(tmp_path / "other", seed=1)
    train = "hnc/hnc_clean_strict_train.json"
    assert (tmp_path / "other" / train).read_bytes() != (root / train).read_bytes()


def test_interrupted_write_leaves_neither_world_nor_staging(tmp_path, monkeypatch):
    def failing(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(world_module, "_write_textvqa", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path / "world")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# the rehearsal LLaVA base


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory) -> Path:
    from hnclip.rehearsal.llava_base import write_rehearsal_llava_base

    return write_rehearsal_llava_base(tmp_path_factory.mktemp("llava") / "base")


def _shapes_only_tower_config(name: str):
    """The converted HF config of a full-size open_clip model built on the meta device (no weights)."""
    from hnclip.llava.export import hf_vision_config_from_open_clip

    with torch.device("meta"):
        return hf_vision_config_from_open_clip(open_clip.create_model(name, pretrained=None, device="meta"))


def test_llava_base_loads_with_the_real_tower_shapes_in_float16(llava_base):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_base)  # transformers 5: dtype "auto"
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)
    assert (vision.intermediate_size, vision.num_attention_heads, vision.hidden_act) == (4096, 16, "quick_gelu")
    assert model.config.image_seq_length == 576
    assert model.config.text_config.hidden_size == 64  # the tiny LLM, not Vicuna-7B's 4096
    assert model.config.text_config.max_position_embeddings >= 576 + 64
    tower = model.model.vision_tower
    assert {p.dtype for p in tower.parameters()} == {torch.float16}
    assert sum(p.numel() for p in tower.parameters()) == pytest.approx(303.5e6, rel=0.01)


def test_converted_vit_l_tower_fits_the_base_and_vit_b_does_not(llava_base):
    from transformers import LlavaConfig

    from hnclip.llava.export import TowerMismatchError, check_tower_fits_llava

    config = LlavaConfig.from_pretrained(llava_base)
    check_tower_fits_llava(_shapes_only_tower_config("ViT-L-14-336-quickgelu"), config)
    with pytest.raises(TowerMismatchError, match="width 768, patch 16, 224 px"):
        check_tower_fits_llava(_shapes_only_tower_config("ViT-B-16"), config)


def test_llava_base_side_files_are_what_inference_loads(llava_base):
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from hnclip.llava.demo_model import OPENAI_CLIP_MEAN, PROTOCOL_FILE

    tokenizer = AutoTokenizer.from_pretrained(llava_base)
    assert tokenizer.convert_tokens_to_ids("<image>") == json.loads((llava_base / "config.json").read_text())[
        "image_token_index"]
    assert tokenizer("What color is the cup?")["input_ids"][0] == tokenizer.bos_token_id
    processor = CLIPImageProcessorPil.from_pretrained(llava_base)
    assert processor.crop_size == {"height": 336, "width": 336}
    assert processor.image_mean == pytest.approx(OPENAI_CLIP_MEAN)
    protocol = json.loads((llava_base / PROTOCOL_FILE).read_text())
    assert protocol["num_image_tokens"] == 576 and protocol["pad_colour"] == [122, 116, 104]
    assert protocol["rehearsal"]["stands_in_for"] == "llava-hf/llava-1.5-7b-hf"


def test_clip_weights_hold_the_base_tower(tmp_path):
    """The saved CLIP is the one the base's tower was converted from, so the baseline's export is the base.
    (The demo's tiny CLIP: saving a ViT-L's 1.7 GB would double this module's time.)"""
    from safetensors import safe_open

    from hnclip.rehearsal.llava_base import write_rehearsal_llava_base

    write_rehearsal_llava_base(tmp_path / "base", clip_name="hnclip-tiny", seed=3,
                               clip_weights_out=tmp_path / "clip.safetensors")
    with safe_open(tmp_path / "clip.safetensors", "pt") as clip, \
            safe_open(tmp_path / "base" / "model.safetensors", "pt") as base:
        assert clip.metadata()["model_name"] == "hnclip-tiny"
        tower = {key.split("vision_tower.", 1)[1]: key for key in base.keys() if "vision_tower." in key}
        pairs = {"visual.conv1.weight": "embeddings.patch_embedding.weight",
                 "visual.transformer.resblocks.1.mlp.c_fc.bias": "encoder.layers.1.mlp.fc1.bias"}
        for clip_key, tower_key in pairs.items():
            ours, theirs = clip.get_tensor(clip_key), base.get_tensor(tower[tower_key])
            assert theirs.dtype == torch.float16
            assert torch.equal(ours.to(torch.float16), theirs), clip_key
        assert clip.get_tensor("visual.conv1.weight").std() > 0  # random init, not zeros
