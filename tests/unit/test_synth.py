"""The synthetic world: formats field by field, caption truth, held-out splits, determinism, layout, answers."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from hnclip.synth import WorldConfig, WorldConfigError, caption_is_true, parse_caption, write_world
from hnclip.synth.language import (
    AndAttrClaim,
    AndExistRelClaim,
    AndRelClaim,
    AttrClaim,
    CompareClaim,
    CountClaim,
    Desc,
    RelClaim,
    VerifyAttrClaim,
    VerifyRelClaim,
    XorAttrClaim,
    XorRelClaim,
    claim_mentions,
)
from hnclip.synth.render import GLYPH_HEIGHT, GLYPH_ROWS, GLYPH_WIDTH, render_sign
from hnclip.synth.vocabulary import COLOUR_RGB, COLOURS, GLYPHS, RELATIONS, SHAPES
from hnclip.synth.world import SceneSampler, choose_heldout

TRAIN_TYPES = {
    "attribute",
    "object",
    "attribute_subg",
    "relation_subj",
    "relation_obj",
    "relation_pred",
    "relation_attr_subj",
    "relation_attr_obj",
    "relation_attr_pred",
    "obj_count",
    "obj_comp_count",
    "obj_verify_count",
    "obj_verify_count_attr",
    "and_logic_attr",
    "and_logic_rel",
    "xor_logic_attr",
    "xor_logic_rel",
}
TEST_TYPES = {
    "relation",
    "xor_logic_relation",
    "xor_logic_attribute",
    "verify_object_attribute",
    "and_logic_relation",
    "relation_attribute",
    "verify_object_relation",
    "object_count",
    "object_compare_count",
    "attribute_relation",
}
HNC_TRAIN_FIELDS = ["caption", "label", "type", "textual_label", "bboxes", "ambiguity", "noisy", "replaced", "cpt_p_id"]
SMALL = WorldConfig(
    seed=7,
    n_train=120,
    n_val=40,
    n_test=40,
    n_vqa_train=90,
    n_vqa_val=60,
    n_textvqa_train=60,
    n_textvqa_val=60,
    zeroshot_per_class=2,
    test_heldout_fraction=0.5,
    duplicate_pair_rate=0.2,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    summary = write_world(root, SMALL)
    return root, summary


def load(root: Path, relative: str):
    return json.loads((root / relative).read_text())


def bag_of_words(caption: str) -> list[str]:
    return sorted(re.findall(r"[a-z]+", caption.lower()))


def all_scene_graphs(root: Path) -> dict:
    return {**load(root, "gqa/train_sceneGraphs.json"), **load(root, "gqa/val_sceneGraphs.json")}


# ------------------------------------------------------------------ config


def test_config_defaults_are_the_demo_world():
    config = WorldConfig()
    assert (config.seed, config.image_size, config.n_train, config.n_val, config.n_test) == (0, 64, 6000, 500, 500)
    assert (config.n_vqa_train, config.n_vqa_val, config.n_textvqa_train, config.n_textvqa_val) == (
        3000,
        500,
        1500,
        300,
    )
    assert (config.zeroshot_per_class, config.max_objects) == (20, 3)
    assert WorldConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 0}, "WorldConfig.image_size = 0"),
        ({"n_train": 50, "n_val": 20, "n_test": 20}, "n_train + n_val + n_test = 90"),
        ({"n_train": 99_000, "n_val": 900, "n_test": 200}, "n_train + n_val + n_test = 100100"),
        ({"max_objects": 1}, "WorldConfig.max_objects = 1"),
        ({"test_heldout_fraction": 1.5}, "WorldConfig.test_heldout_fraction = 1.5"),
        ({"seed": -1}, "WorldConfig.seed = -1"),
        ({"n_val": True}, "WorldConfig.n_val must be an integer"),
        ({"jpeg_quality": "high"}, "WorldConfig.jpeg_quality must be an integer"),
        ({"n_test": 0}, "WorldConfig.n_test = 0"),
        ({"min_gap": 0.5}, "WorldConfig.min_gap = 0.5"),
        ({"diagonal_pairs": "no"}, "WorldConfig.diagonal_pairs = 'no'"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes, message):
    with pytest.raises(WorldConfigError, match=re.escape(message)):
        WorldConfig(**changes)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(WorldConfigError, match="unknown WorldConfig field.*n_images"):
        WorldConfig.from_dict({"n_images": 10})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        WorldConfig().seed = 3  # type: ignore[misc]


# ------------------------------------------------------------------ files and formats


def test_every_file_of_the_layout_is_written(world):
    root, _ = world
    expected = [
        "gqa/train_sceneGraphs.json",
        "gqa/val_sceneGraphs.json",
        "hnc/hnc_clean_strict_train.json",
        "hnc/hnc_clean_strict_val.json",
        "hnc/hnc_clean_strict_test.json",
        "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
        "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqav2/v2_mscoco_train2014_annotations.json",
        "vqav2/v2_mscoco_val2014_annotations.json",
        "textvqa/TextVQA_0.5.1_train.json",
        "textvqa/TextVQA_0.5.1_val.json",
        "textvqa/TextVQA_Rosetta_OCR_v0.2_train.json",
        "textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
        "world.json",
    ]
    for relative in expected:
        assert (root / relative).is_file(), relative
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_gqa_scene_graphs_have_gqa_format_and_ids(world):
    root, _ = world
    train, val = load(root, "gqa/train_sceneGraphs.json"), load(root, "gqa/val_sceneGraphs.json")
    assert len(train) == SMALL.n_train and len(val) == SMALL.n_val + SMALL.n_test
    assert all(re.fullmatch(r"\d{7}", k) for k in train)
    assert sum(bool(re.fullmatch(r"n\d{6}", k)) for k in val) == SMALL.n_test
    assert not set(train) & set(val)
    for image_id, entry in {**train, **val}.items():
        assert set(entry) == {"width", "height", "objects"}
        assert entry["width"] == entry["height"] == SMALL.image_size
        assert 2 <= len(entry["objects"]) <= SMALL.max_objects
        for obj in entry["objects"].values():
            assert set(obj) == {"name", "x", "y", "w", "h", "attributes", "relations"}
            assert obj["name"] in SHAPES
            assert all(isinstance(obj[k], int) for k in "xywh")
            assert isinstance(obj["relations"], list)
            for relation in obj["relations"]:
                assert set(relation) == {"name", "object"} and relation["name"] in RELATIONS
                assert relation["object"] in entry["objects"]
        assert (root / "gqa" / "images" / f"{image_id}.jpg").is_file()
        assert Image.open(root / "gqa" / "images" / f"{image_id}.jpg").size == (SMALL.image_size,) * 2


def test_most_images_have_two_objects(world):
    root, _ = world
    sizes = Counter(len(e["objects"]) for e in all_scene_graphs(root).values())
    assert sizes[2] > sum(sizes.values()) / 2 and sizes[3] > 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_hnc_trainval_records_have_hnc_format(world, split):
    root, _ = world
    hnc = load(root, f"hnc/hnc_clean_strict_{split}.json")
    graphs = load(root, f"gqa/{split}_sceneGraphs.json")
    assert set(hnc) <= set(graphs) and len(hnc) == (SMALL.n_train if split == "train" else SMALL.n_val)
    for image_id, image in hnc.items():
        assert list(image) == ["captions"]
        records = image["captions"]
        positives = {cid for cid, r in records.items() if r["label"] == 1}
        negatives = [r for r in records.values() if r["label"] == 0]
        assert len(positives) >= 1 and len(negatives) == len(positives)
        for cid, record in records.items():
            assert cid.isdigit() and list(record) == HNC_TRAIN_FIELDS
            assert isinstance(record["caption"], str) and record["type"] in TRAIN_TYPES
            assert isinstance(record["ambiguity"], dict) and record["noisy"] is None
            for oid, box in record["bboxes"].items():
                assert oid in graphs[image_id]["objects"] and box["name"] == graphs[image_id]["objects"][oid]["name"]
                assert set(box["bbox"]) == {"x", "y", "w", "h"}
            if record["label"] == 1:
                assert record["cpt_p_id"] is None and record["replaced"] is None
            else:
                assert isinstance(record["cpt_p_id"], int) and str(record["cpt_p_id"]) in positives
                assert records[str(record["cpt_p_id"])]["type"] == record["type"]
                assert isinstance(record["replaced"], list) and len(record["replaced"]) == 2
        linked = Counter(str(r["cpt_p_id"]) for r in negatives)
        assert set(linked) == positives and set(linked.values()) == {1}, "one negative per positive"


def test_hnc_test_file_has_test_format(world):
    root, _ = world
    test = load(root, "hnc/hnc_clean_strict_test.json")
    assert len(test) == SMALL.n_test and all(re.fullmatch(r"n\d{6}\.jpg", k) for k in test)
    stripped_differs = 0
    for records in test.values():
        assert list(records) == [str(i) for i in range(len(records))] and len(records) % 2 == 0
        for i in range(len(records) // 2):
            positive, negative = records[str(2 * i)], records[str(2 * i + 1)]
            assert set(positive) == set(negative) == {"caption", "label", "type", "replaced"}
            assert (positive["label"], negative["label"]) == (1, 0)
            assert positive["type"] == negative["type"] and positive["type"] in TEST_TYPES
            stripped_differs += positive["caption"] != positive["caption"].strip() or not positive["caption"].endswith(
                "."
            )
    assert stripped_differs > 0, "hand-typed variation (no period, stray space) should occur"


def test_all_caption_types_are_generated(world):
    _, summary = world
    assert set(summary["gqa_hnc"]["train"]["by_type"]) == TRAIN_TYPES
    assert set(summary["gqa_hnc"]["test"]["by_type"]) == TEST_TYPES


def test_relation_negatives_are_plentiful_and_include_swaps(world):
    root, _ = world
    records = [
        r for image in load(root, "hnc/hnc_clean_strict_train.json").values() for r in image["captions"].values()
    ]
    negatives = [r for r in records if r["label"] == 0]
    relation = [r for r in negatives if r["type"].startswith("relation")]
    assert len(relation) / len(negatives) > 0.45
    swaps = 0
    for image in load(root, "hnc/hnc_clean_strict_train.json").values():
        for record in image["captions"].values():
            if record["label"] == 0 and record["type"].startswith("relation"):
                positive = image["captions"][str(record["cpt_p_id"])]["caption"]
                swaps += bag_of_words(positive) == bag_of_words(record["caption"])
    assert swaps / len(relation) > 0.4, "subject/object swaps keep the bag of words: a bag-of-words model fails them"


# ------------------------------------------------------------------ caption truth


def test_every_positive_is_true_and_every_negative_false_in_every_split(world):
    root, _ = world
    graphs = all_scene_graphs(root)
    checked = 0
    for split in ("train", "val"):
        for image_id, image in load(root, f"hnc/hnc_clean_strict_{split}.json").items():
            for record in image["captions"].values():
                assert caption_is_true(record["caption"], graphs[image_id]) == (record["label"] == 1), record
                checked += 1
    for name, records in load(root, "hnc/hnc_clean_strict_test.json").items():
        for record in records.values():
            assert caption_is_true(record["caption"], graphs[name.removesuffix(".jpg")]) == (record["label"] == 1)
            checked += 1
    assert checked > 2 * 5 * (SMALL.n_train + SMALL.n_val)


HAND_SCENE = {
    "width": 64,
    "height": 64,
    "objects": {
        "1": {
            "name": "circle",
            "x": 2,
            "y": 2,
            "w": 20,
            "h": 20,
            "attributes": ["red", "large"],
            "relations": [{"name": "to the left of", "object": "2"}, {"name": "above", "object": "3"}],
        },
        "2": {
            "name": "square",
            "x": 40,
            "y": 10,
            "w": 12,
            "h": 12,
            "attributes": ["blue", "small"],
            "relations": [{"name": "to the right of", "object": "1"}, {"name": "to the right of", "object": "3"}],
        },
        "3": {
            "name": "triangle",
            "x": 4,
            "y": 40,
            "w": 20,
            "h": 20,
            "attributes": ["blue", "large"],
            "relations": [{"name": "below", "object": "1"}, {"name": "to the left of", "object": "2"}],
        },
    },
}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("The circle is red.", True),
        ("The circle is blue.", False),
        ("the square is small", True),
        ("  The large triangle is blue.  ", True),
        ("The blue shape is large.", False),  # two blue shapes: "the" fails
        ("The circle is to the left of the square.", True),
        ("The square is to the left of the circle.", False),
        ("The circle is to the left of the circle.", False),
        ("The diamond is above the triangle.", False),
        ("There are two blue shapes.", True),
        ("There is one blue shape.", False),
        ("There are three shapes.", True),
        ("There are more blue shapes than red shapes.", True),
        ("There are as many circles as squares.", True),
        ("There are fewer triangles than diamonds.", False),
        ("There is at least one shape that is to the left of the square.", True),
        ("There is no shape that is to the left of the square.", False),
        ("There is no triangle that is above the circle.", True),
        ("There is at least one square that is blue.", True),
        ("There is no circle that is blue.", True),
        ("There is both a red circle and a small square.", True),
        ("There is both a red and a blue circle.", False),
        ("There is both a blue and a large triangle.", True),
        ("The circle is both to the left of the square and above the triangle.", True),
        ("The circle is both to the left of the square and below the triangle.", False),
        ("There is both a circle to the left of the square and a triangle to the left of the square.", True),
        ("There is both a circle to the left of the square and a square to the left of the triangle.", False),
        ("There is either a red circle or a blue circle.", True),
        ("There is either a red circle or a blue square.", False),  # both: exclusive or
        ("There is either a green circle or a red square.", False),  # neither
        ("The circle is to the left of either the square or the triangle.", True),
        ("The circle is above either the square or the triangle.", True),
        ("The circle is below either the square or the triangle.", False),
        ("The circle is to the left of either the square or the diamond.", True),
    ],
)
def test_caption_semantics_on_a_hand_built_scene_graph(caption, expected):
    assert caption_is_true(caption, HAND_SCENE) is expected


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "The circle is near the square.",
        "There are many circles.",
        "A red circle.",
        "The circle is red and blue.",
        "The big circle is red.",
        "There is both a red circle.",
        "The circle is to the left of the square and",
    ],
)
def test_parser_rejects_captions_outside_the_grammar_naming_them(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        parse_caption(caption)


@pytest.mark.parametrize(
    "claim",
    [
        AttrClaim(Desc("circle", size="large"), "red"),
        RelClaim(Desc("cross", colour="gray"), "below", Desc("diamond")),
        CountClaim(Desc("shape", colour="purple"), 3),
        CountClaim(Desc("cross"), 1),
        CompareClaim(Desc("cross"), "as many", Desc("square")),
        CompareClaim(Desc("circle"), "fewer", Desc("triangle")),
        VerifyAttrClaim(False, Desc("square"), "small"),
        VerifyRelClaim(True, Desc("triangle"), "to the right of", Desc("circle", colour="yellow")),
        AndAttrClaim(Desc("circle", colour="red"), Desc("circle", colour="blue")),
        AndAttrClaim(Desc("circle", size="small"), Desc("square", colour="green")),
        AndRelClaim(Desc("circle"), "above", Desc("square"), "to the left of", Desc("triangle", size="small")),
        AndExistRelClaim(Desc("circle"), "above", Desc("square"), Desc("cross"), "below", Desc("square")),
        XorAttrClaim(Desc("diamond", colour="green"), Desc("cross", size="large")),
        XorRelClaim(Desc("circle"), "to the right of", Desc("square"), Desc("diamond", colour="red")),
    ],
)
def test_parse_inverts_text_for_every_sentence_form(claim):
    assert parse_caption(claim.text()) == claim
    assert parse_caption(claim.text().lower().rstrip(".")) == claim


def test_mentions_name_pairs_and_canonical_triples():
    pairs, triples = claim_mentions(parse_caption("There is both a red and a blue circle."))
    assert pairs == {("red", "circle"), ("blue", "circle")} and triples == set()
    pairs, triples = claim_mentions(parse_caption("There is no square that is green."))
    assert pairs == {("green", "square")}
    _, triples = claim_mentions(parse_caption("The circle is to the right of the red square."))
    assert triples == {("square", "to the left of", "circle")}
    _, triples = claim_mentions(parse_caption("The red shape is below the square."))
    assert triples == set()  # a generic noun names no shape


# ------------------------------------------------------------------ held-out combinations


def _scene_combinations(entry: dict) -> tuple[set, set]:
    """Pairs and canonical triples in a scene graph, computed here from attributes and relation lists."""
    objects = entry["objects"]
    pairs = {(c, o["name"]) for o in objects.values() for c in o["attributes"] if c in COLOURS}
    canonical = {
        "to the left of": ("to the left of", False),
        "to the right of": ("to the left of", True),
        "above": ("above", False),
        "below": ("above", True),
    }
    triples = set()
    for oid, obj in objects.items():
        for rel in obj["relations"]:
            name, flipped = canonical[rel["name"]]
            a, b = obj["name"], objects[rel["object"]]["name"]
            triples.add((b, name, a) if flipped else (a, name, b))
    return pairs, triples


def test_heldout_combinations_appear_only_in_test_splits(world):
    root, _ = world
    info = load(root, "world.json")
    held_pairs = {tuple(p) for p in info["heldout"]["colour_shape"]}
    held_triples = {tuple(t) for t in info["heldout"]["relation"]}
    assert len(held_pairs) == SMALL.heldout_colour_shape_pairs and len(held_triples) == SMALL.heldout_relation_triples
    graphs = all_scene_graphs(root)
    seen_in_test = set()
    for image_id, entry in graphs.items():
        pairs, triples = _scene_combinations(entry)
        shown = (pairs & held_pairs) | (triples & held_triples)
        if image_id.startswith("n"):
            seen_in_test |= shown
        else:
            assert not shown, f"{image_id} (train/val) shows held-out {shown}"
    assert seen_in_test == held_pairs | held_triples, "every held-out combination is tested"
    assert set(info["heldout_images"]["hnc_test"]) == {
        i
        for i, e in graphs.items()
        if i.startswith("n")
        and ((_scene_combinations(e)[0] & held_pairs) or (_scene_combinations(e)[1] & held_triples))
    }
    for split in ("train", "val"):
        for image in load(root, f"hnc/hnc_clean_strict_{split}.json").values():
            for record in image["captions"].values():
                pairs, triples = claim_mentions(parse_caption(record["caption"]))
                assert not pairs & held_pairs and not triples & held_triples, record["caption"]
                for colour, shape in held_pairs:
                    assert f"{colour} {shape}" not in record["caption"].lower()


def test_heldout_combinations_stay_out_of_vqa_and_textvqa_train(world):
    root, _ = world
    info = load(root, "world.json")
    held_pairs = {tuple(p) for p in info["heldout"]["colour_shape"]}
    questions = load(root, "vqav2/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    annotations = {a["question_id"]: a for a in load(root, "vqav2/v2_mscoco_train2014_annotations.json")["annotations"]}
    for question in questions:
        text = question["question"].lower()
        assert not any(f"{c} {s}" in text for c, s in held_pairs), text
        answer = annotations[question["question_id"]]["multiple_choice_answer"]
        colour_of = re.fullmatch(r"what color is the (?:\w+ )?(\w+)\?", text)
        if colour_of:
            assert (answer, colour_of.group(1)) not in held_pairs
        shape_of = re.fullmatch(r"what is the shape of the (\w+) object\?", text)
        if shape_of:
            assert (shape_of.group(1), answer) not in held_pairs
    held_words = {w.lower() for w in info["heldout"]["textvqa_words"]}
    train_words = {
        r["image_id"]: r["ocr_tokens"] for r in load(root, "textvqa/TextVQA_Rosetta_OCR_v0.2_train.json")["data"]
    }
    for item in load(root, "textvqa/TextVQA_0.5.1_train.json")["data"]:
        majority = Counter(item["answers"]).most_common(1)[0][0]
        assert majority not in held_words
    assert info["heldout_images"]["textvqa_val"], "held-out words appear in TextVQA val"
    assert info["heldout_images"]["vqav2_val"], "held-out combinations appear in VQA val"
    assert len(train_words) == SMALL.n_textvqa_train


def test_heldout_choice_is_seeded_and_spread():
    first, again = choose_heldout(WorldConfig(seed=3)), choose_heldout(WorldConfig(seed=3))
    assert first == again
    colours = [c for c, _ in first.colour_shape]
    shapes = [s for _, s in first.colour_shape]
    assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
    assert all(r in ("to the left of", "above") for _, r, _ in first.relation)


# ------------------------------------------------------------------ layout and pixels


def test_relations_are_unambiguous_from_the_boxes(world):
    root, _ = world
    rules = load(root, "world.json")["layout"]
    gap, border, size = rules["min_gap_px"], rules["border_px"], rules["image_size"]
    for image_id, entry in all_scene_graphs(root).items():
        objects = entry["objects"]
        for obj in objects.values():
            assert obj["x"] >= border and obj["y"] >= border
            assert obj["x"] + obj["w"] <= size - border and obj["y"] + obj["h"] <= size - border
        for (ia, a), (ib, b) in combinations(objects.items(), 2):
            dx = max(b["x"] - (a["x"] + a["w"]), a["x"] - (b["x"] + b["w"]))
            dy = max(b["y"] - (a["y"] + a["h"]), a["y"] - (b["y"] + b["h"]))
            assert dx >= gap or dy >= gap, f"{image_id}: {ia} and {ib} touch"
            assert dx >= gap or -dx >= math.ceil(min(a["w"], b["w"]) / 2), f"{image_id}: x ambiguous"
            assert dy >= gap or -dy >= math.ceil(min(a["h"], b["h"]) / 2), f"{image_id}: y ambiguous"
        for oid, obj in objects.items():
            expected = set()
            for other_id, other in objects.items():
                if other_id == oid:
                    continue
                if other["x"] - (obj["x"] + obj["w"]) >= gap:
                    expected.add(("to the left of", other_id))
                if obj["x"] - (other["x"] + other["w"]) >= gap:
                    expected.add(("to the right of", other_id))
                if other["y"] - (obj["y"] + obj["h"]) >= gap:
                    expected.add(("above", other_id))
                if obj["y"] - (other["y"] + other["h"]) >= gap:
                    expected.add(("below", other_id))
            assert {(r["name"], r["object"]) for r in obj["relations"]} == expected


def _colour_distance(pixel, rgb) -> float:
    return math.dist(pixel, rgb)


def test_pixels_show_each_object_inside_its_box_and_nothing_outside(world):
    root, _ = world
    graphs = load(root, "gqa/train_sceneGraphs.json")
    for image_id in list(graphs)[:25]:
        entry = graphs[image_id]
        image = Image.open(root / "gqa" / "images" / f"{image_id}.jpg").convert("RGB")
        background = image.getpixel((0, 0))
        for obj in entry["objects"].values():
            colour = next(c for c in obj["attributes"] if c in COLOURS)
            centre = image.getpixel((obj["x"] + obj["w"] // 2, obj["y"] + obj["h"] * 2 // 3))
            nearest = min(COLOURS, key=lambda c: _colour_distance(centre, COLOUR_RGB[c]))
            assert nearest == colour, f"{image_id}: object coloured {colour} looks {nearest}"
        for y in range(entry["height"]):
            for x in range(entry["width"]):
                near_box = any(
                    o["x"] - 2 <= x < o["x"] + o["w"] + 2 and o["y"] - 2 <= y < o["y"] + o["h"] + 2
                    for o in entry["objects"].values()
                )
                if not near_box:
                    assert _colour_distance(image.getpixel((x, y)), background) < 30, f"{image_id} at {(x, y)}"


@pytest.mark.parametrize(("image_size", "max_objects"), [(32, 4), (64, 4), (128, 3)])
def test_layout_succeeds_at_other_sizes(image_size, max_objects):
    config = WorldConfig(image_size=image_size, max_objects=max_objects)
    sampler = SceneSampler(config, choose_heldout(config))
    for k in range(150):
        scene = sampler.sample(random.Random(k), ["a", "b", "c", "d"], "exclude")
        assert 2 <= len(scene.objects) <= max_objects


@pytest.mark.parametrize("diagonal", [True, False])
def test_layout_keeps_the_gap_and_diagonal_pairs_only_when_allowed(diagonal):
    config = WorldConfig(max_objects=2, min_gap=0.25, diagonal_pairs=diagonal)
    sampler = SceneSampler(config, choose_heldout(config))
    gap = round(0.25 * config.image_size)
    apart_on_both_axes = 0
    for k in range(300):
        a, b = sampler.sample(random.Random(k), ["a", "b"], "exclude").objects
        gaps = [max(b.x - (a.x + a.w), a.x - (b.x + b.w)), max(b.y - (a.y + a.h), a.y - (b.y + b.h))]
        assert max(gaps) >= gap, f"scene {k}: shapes only {max(gaps)} px apart"
        apart_on_both_axes += min(gaps) >= gap
    assert (apart_on_both_axes > 0) == diagonal


def _read_sign_at_32px(word: str, seed: int) -> str:
    """Downsample a 64 px sign to 32 px, then match each glyph's 5 x 7 cells against every bitmap."""
    sign = render_sign(word, 64, random.Random(seed))
    small = sign.image.convert("L").resize((32, 32), Image.BICUBIC)
    x, y, w, h = (v / 2 for v in sign.word_box)
    cell = h / GLYPH_HEIGHT
    read = ""
    for k in range(len(word)):
        left = x + k * (GLYPH_WIDTH + 1) * cell
        crop = small.crop((round(left), round(y), round(left + GLYPH_WIDTH * cell), round(y + h)))
        cells = list(crop.resize((GLYPH_WIDTH, GLYPH_HEIGHT), Image.BOX).tobytes())
        low, high = min(cells), max(cells)
        board_is_dark = small.getpixel((int(x) - 1, int(y) - 1)) < (low + high) / 2
        ink = [(v > (low + high) / 2) == board_is_dark for v in cells]

        def mismatch(glyph: str) -> int:
            bits = [b == "1" for row in GLYPH_ROWS[glyph] for b in row]
            return sum(a != b for a, b in zip(bits, ink))

        read += min(GLYPHS, key=mismatch)
    return read


def test_sign_glyphs_stay_legible_at_32_px():
    words = list(GLYPHS) + ["K3", "B8", "Q0", "MW", "7H", "S5"]
    misread = [(w, got) for i, w in enumerate(words) if (got := _read_sign_at_32px(w, i)) != w]
    assert not misread


# ------------------------------------------------------------------ VQA v2


@pytest.mark.parametrize("subtype", ["train2014", "val2014"])
def test_vqa_files_have_vqa_v2_format(world, subtype):
    root, _ = world
    questions = load(root, f"vqav2/v2_OpenEnded_mscoco_{subtype}_questions.json")
    annotations = load(root, f"vqav2/v2_mscoco_{subtype}_annotations.json")
    assert questions["data_subtype"] == annotations["data_subtype"] == subtype
    assert questions["task_type"] == "Open-Ended"
    n_expected = SMALL.n_vqa_train if subtype == "train2014" else SMALL.n_vqa_val
    assert len(questions["questions"]) == len(annotations["annotations"]) == n_expected
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    assert len(by_id) == n_expected
    for question in questions["questions"]:
        assert set(question) == {"image_id", "question", "question_id"}
        assert isinstance(question["image_id"], int) and isinstance(question["question_id"], int)
        assert question["question"].endswith("?")
        assert (root / "vqav2" / subtype / f"COCO_{subtype}_{question['image_id']:012d}.jpg").is_file()
        annotation = by_id[question["question_id"]]
        assert set(annotation) == {
            "question_type",
            "multiple_choice_answer",
            "answers",
            "image_id",
            "answer_type",
            "question_id",
        }
        assert annotation["image_id"] == question["image_id"]
        assert question["question"].lower().startswith(annotation["question_type"])
        assert annotation["answer_type"] in {"yes/no", "number", "other"}
        answers = annotation["answers"]
        assert [a["answer_id"] for a in answers] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in answers)
        assert all(a["answer_confidence"] in {"yes", "maybe", "no"} for a in answers)
        counts = Counter(a["answer"] for a in answers)
        assert counts[annotation["multiple_choice_answer"]] == max(counts.values())


def test_vqa_answers_agree_mostly_and_disagree_sometimes(world):
    root, _ = world
    annotations = [
        a
        for subtype in ("train2014", "val2014")
        for a in load(root, f"vqav2/v2_mscoco_{subtype}_annotations.json")["annotations"]
    ]
    unanimous = sum(len({x["answer"] for x in a["answers"]}) == 1 for a in annotations)
    majority = sum(Counter(x["answer"] for x in a["answers"])[a["multiple_choice_answer"]] >= 4 for a in annotations)
    assert 0.1 < unanimous / len(annotations) < 0.95
    assert majority / len(annotations) > 0.95
    spelled = {x["answer"] for a in annotations for x in a["answers"]}
    assert spelled & {"one", "two", "three", "four", "zero", "grey"}, "synonyms such as 'two' for '2' occur"
    assert {a["answer_type"] for a in annotations} == {"yes/no", "number", "other"}
    yes_no = Counter(a["multiple_choice_answer"] for a in annotations if a["answer_type"] == "yes/no")
    assert yes_no["yes"] > 0.25 * sum(yes_no.values()) and yes_no["no"] > 0.25 * sum(yes_no.values())


def test_vqa_count_answers_match_question(world):
    root, _ = world
    questions = load(root, "vqav2/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    annotations = {a["question_id"]: a for a in load(root, "vqav2/v2_mscoco_train2014_annotations.json")["annotations"]}
    for question in questions:
        if question["question"] == "How many shapes are there?":
            answers = Counter(a["answer"] for a in annotations[question["question_id"]]["answers"])
            assert answers.most_common(1)[0][0] in {"2", "3", "two", "three"}


# ------------------------------------------------------------------ TextVQA


@pytest.mark.parametrize("split", ["train", "val"])
def test_textvqa_files_have_textvqa_format_with_ocr(world, split):
    root, _ = world
    data = load(root, f"textvqa/TextVQA_0.5.1_{split}.json")
    ocr = load(root, f"textvqa/TextVQA_Rosetta_OCR_v0.2_{split}.json")
    assert data["dataset_name"] == "textvqa" and data["dataset_type"] == split
    items = data["data"]
    assert len(items) == (SMALL.n_textvqa_train if split == "train" else SMALL.n_textvqa_val)
    fields = {
        "question",
        "image_id",
        "image_classes",
        "flickr_original_url",
        "flickr_300k_url",
        "image_width",
        "image_height",
        "answers",
        "question_tokens",
        "question_id",
        "set_name",
    }
    for item in items:
        assert set(item) == fields and item["set_name"] == split
        assert re.fullmatch(r"[0-9a-f]{16}", item["image_id"]) and isinstance(item["question_id"], int)
        assert len(item["answers"]) == 10 and all(isinstance(a, str) for a in item["answers"])
        assert item["question_tokens"] == item["question"].rstrip("?").split()
        assert item["flickr_original_url"].startswith("https://")
        assert (root / "textvqa" / "train_images" / f"{item['image_id']}.jpg").is_file()
    records = {r["image_id"]: r for r in ocr["data"]}
    assert set(records) == {i["image_id"] for i in items}
    answer_in_ocr = 0
    for item in items:
        record = records[item["image_id"]]
        assert record["ocr_tokens"] == [info["word"] for info in record["ocr_info"]]
        for info in record["ocr_info"]:
            box = info["bounding_box"]
            assert {"top_left_x", "top_left_y", "width", "height"} <= set(box)
            assert 0 <= box["top_left_x"] <= 1 and 0 < box["width"] <= 1
        majority = Counter(item["answers"]).most_common(1)[0][0]
        answer_in_ocr += any(majority in token.lower() for token in record["ocr_tokens"])
    assert 0.75 < answer_in_ocr / len(items) < 1.0, "OCR finds most words, with some noise"


def test_textvqa_question_ids_are_unique_across_splits(world):
    root, _ = world
    ids = [i["question_id"] for s in ("train", "val") for i in load(root, f"textvqa/TextVQA_0.5.1_{s}.json")["data"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------ zero-shot, world.json, determinism


def test_zeroshot_tree_has_one_folder_per_colour_shape(world):
    root, _ = world
    folders = sorted(p.name for p in (root / "zeroshot").iterdir())
    assert folders == sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
    for name in folders:
        files = sorted(p.name for p in (root / "zeroshot" / name).iterdir())
        assert files == [f"{k:05d}.jpg" for k in range(SMALL.zeroshot_per_class)]
    image = Image.open(root / "zeroshot" / "blue_square" / "00000.jpg").convert("RGB")
    raw = image.tobytes()
    darkest = min((tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)), key=sum)
    assert min(COLOURS, key=lambda c: _colour_distance(darkest, COLOUR_RGB[c])) == "blue"


def test_world_json_records_config_counts_and_vocabulary(world):
    root, summary = world
    info = load(root, "world.json")
    assert info["config"] == SMALL.to_dict()
    assert info["counts"] == json.loads(json.dumps(summary))
    assert info["vocabulary"]["shapes"] == list(SHAPES)
    train = load(root, "hnc/hnc_clean_strict_train.json")
    pairs = sum(len(image["captions"]) // 2 for image in train.values())
    assert info["counts"]["gqa_hnc"]["train"]["pairs"] == pairs
    duplicates = sum(
        len(texts) - len(set(texts))
        for image in train.values()
        for texts in [[r["caption"] for r in image["captions"].values() if r["label"] == 1]]
    )
    assert duplicates == info["counts"]["gqa_hnc"]["train"]["duplicate_pairs"] > 0


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_config_gives_byte_identical_files(tmp_path):
    config = WorldConfig(
        seed=11,
        n_train=60,
        n_val=20,
        n_test=20,
        n_vqa_train=12,
        n_vqa_val=6,
        n_textvqa_train=6,
        n_textvqa_val=6,
        zeroshot_per_class=1,
    )
    write_world(tmp_path / "a", config)
    write_world(tmp_path / "b", config)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert first.keys() == second.keys() and first == second
    write_world(tmp_path / "a", dataclasses.replace(config, seed=12))  # rewriting in place replaces the world
    assert _file_bytes(tmp_path / "a")["hnc/hnc_clean_strict_train.json"] != first["hnc/hnc_clean_strict_train.json"]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]
