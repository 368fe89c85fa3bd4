"""Compositionality benchmark readers, ARO's word-order perturbations and the accuracies, on published-format records.

SugarCrepe, Karpathy and Visual Genome records are copied verbatim from the published files; ARO's VG records and
the Winoground lines are hand-written in the documented format (see the module docstring for the sources).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hnclip.data import DataFormatError, MissingImageError
from hnclip.data.compositional import (
    ARO_VG_ATTRIBUTION_MIN_COUNT,
    ARO_VG_RELATION_EXCLUDED,
    ITEM_COLUMNS,
    ORDER_PERTURBATIONS_SOURCE,
    SUGARCREPE_AGGREGATES,
    SUGARCREPE_CATEGORIES,
    WINOGROUND_COLUMNS,
    CompositionalFormatError,
    aro_macro_accuracy,
    aro_pre_caption,
    group_accuracies,
    heuristic_pos_tagger,
    macro_accuracy,
    micro_accuracy,
    order_negatives,
    read_order_captions,
    read_sugarcrepe,
    read_vg_attribution,
    read_vg_image_data,
    read_vg_relation,
    read_winoground,
    shuffle_all_but_nouns_and_adjectives,
    shuffle_nouns_and_adjectives,
    shuffle_trigrams,
    shuffle_within_trigrams,
    tokenize_caption,
    winoground_scores,
)

# RAIVNLab/sugar-crepe data/add_att.json items "0", "1"; data/swap_obj.json "107", "109" (there is no "108");
# data/replace_rel.json "2".
SUGARCREPE = {
    "add_att": {
        "0": {"filename": "000000085329.jpg",
              "caption": "A drawing of a young woman with many facial piercings.",
              "negative_caption": "A drawing of a tattooed young woman with many facial piercings."},
        "1": {"filename": "000000562121.jpg",
              "caption": "Two zebras are battling each other on hind legs.",
              "negative_caption": "Two striped-and-spotted zebras are battling each other on hind legs."},
    },
    "swap_obj": {
        "107": {"filename": "000000084674.jpg",
                "caption": "a girl holds a baby eating a bagel with a boy standing next to them",
                "negative_caption": "A boy holds a baby eating a bagel with a girl standing next to them."},
        "109": {"filename": "000000007816.jpg",
                "caption": "A person on a motorcycles driving past a group of people behind a fence.",
                "negative_caption": "A group of people on motorcycles driving past a person behind a fence."},
    },
    "replace_rel": {
        "2": {"filename": "000000301867.jpg",
              "caption": "THERE ARE WOMEN THAT ARE LAUGHING UNDER THE UMBRELLA",
              "negative_caption": "There are women that are laughing next to the umbrella."},
    },
}
CATEGORIES = tuple(SUGARCREPE)

# ARO's fields (dataset_zoo/aro_datasets.py); the values are invented.
VG_RELATION = [
    {"image_id": "2338864", "relation_name": "sitting on", "image_path": "2338864.jpg", "bbox_x": 14, "bbox_y": 30,
     "bbox_w": 401, "bbox_h": 290, "true_caption": "the man is sitting on the bench",
     "false_caption": "the bench is sitting on the man"},
    {"image_id": 2410513, "relation_name": "near", "image_path": "2410513.jpg", "bbox_x": 0.5, "bbox_y": 12,
     "bbox_w": 333, "bbox_h": 250.25, "true_caption": "the dog is near the car",
     "false_caption": "the car is near the dog"},
]
VG_ATTRIBUTION = [
    {"image_id": "2410513", "attributes": ["white", "black"], "image_path": "2410513.jpg", "bbox_x": 0, "bbox_y": 12,
     "bbox_w": 333, "bbox_h": 250, "true_caption": "the white plate and the black table",
     "false_caption": "the black plate and the white table"},
]

# The first record of BLIP's coco_karpathy_test.json and of flickr30k_test.json.
COCO_KARPATHY = [{
    "image": "val2014/COCO_val2014_000000391895.jpg",
    "caption": ["A man with a red helmet on a small moped on a dirt road. ",
                "Man riding a motor bike on a dirt road on the countryside.",
                "A man riding on the back of a motorcycle.",
                "A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a "
                "bridge and a background of cloud-wreathed mountains. ",
                "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
}]
FLICKR_KARPATHY = [{
    "image": "flickr30k-images/1007129816.jpg",
    "caption": ["The man with pierced ears is wearing glasses and an orange hat.",
                "A man with glasses is wearing a beer can crocheted hat.",
                "A man with gauges and glasses is wearing a Blitz hat.",
                "A man in an orange hat starring at something.",
                "A man wears an orange hat and glasses."],
}]

# Winoground examples 0, 3 and 4 (captions and tags as published), in examples.jsonl's fields.
WINOGROUND = [
    {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "an old person kisses a young person",
     "caption_1": "a young person kisses an old person", "tag": "Adjective-Age", "secondary_tag": "",
     "num_main_preds": 1, "collapsed_tag": "Relation"},
    {"id": 3, "image_0": "ex_3_img_0", "image_1": "ex_3_img_1", "caption_0": "a person watches an animal",
     "caption_1": "an animal watches a person", "tag": "Noun", "secondary_tag": "", "num_main_preds": 1,
     "collapsed_tag": "Object"},
    {"id": 4, "image_0": "ex_4_img_0", "image_1": "ex_4_img_1",
     "caption_0": "the person without earrings pays the person with earrings",
     "caption_1": "the person with earrings pays the person without earrings", "tag": "Negation, Scope",
     "secondary_tag": "Morpheme-Level", "num_main_preds": 1, "collapsed_tag": "Relation"},
]

# Visual Genome image_data.json: its first two records, then one of an image that is also in COCO.
VG_IMAGE_DATA = [
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 600, "image_id": 1,
     "coco_id": None, "flickr_id": None},
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg", "height": 600, "image_id": 2,
     "coco_id": None, "flickr_id": None},
    {"width": 640, "url": "https://cs.stanford.edu/people/rak248/VG_100K/51.jpg", "height": 480, "image_id": 51,
     "coco_id": 391895, "flickr_id": 1007129816},
]


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=4), encoding="utf-8")
    return path


def touch_images(images_dir: Path, names) -> Path:
    for name in names:
        (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (images_dir / name).write_bytes(b"")
    return images_dir


# --------------------------------------------------------------------------------------------------------
# SugarCrepe


@pytest.fixture
def sugarcrepe(tmp_path):
    json_dir = tmp_path / "sugar_crepe"
    for category, items in SUGARCREPE.items():
        write_json(json_dir / f"{category}.json", items)
    names = [item["filename"] for items in SUGARCREPE.values() for item in items.values()]
    return json_dir, touch_images(tmp_path / "val2017", names)


def test_sugarcrepe_items_follow_the_published_files(sugarcrepe):
    json_dir, images = sugarcrepe
    frame = read_sugarcrepe(json_dir, images, categories=CATEGORIES)
    assert tuple(frame.columns) == ITEM_COLUMNS
    assert list(frame["item_id"]) == ["add_att:0", "add_att:1", "swap_obj:107", "swap_obj:109", "replace_rel:2"]
    assert set(frame["benchmark"]) == {"sugarcrepe"}
    first = frame.iloc[0]
    assert first["subset"] == "add_att"
    assert first["positive"] == "A drawing of a young woman with many facial piercings."
    assert first["negatives"] == ["A drawing of a tattooed young woman with many facial piercings."]
    assert first["image_path"] == str(images / "000000085329.jpg")
    assert first["bbox"] is None
    assert list(frame["coco_id"]) == [85329, 562121, 84674, 7816, 301867]
    assert str(frame["coco_id"].dtype) == "Int64" and frame["vg_id"].isna().all() and frame["flickr_id"].isna().all()
    assert frame.attrs["dropped"] == {"missing_image": 0}


def test_sugarcrepe_categories_and_aggregates_agree():
    assert sorted(c for members in SUGARCREPE_AGGREGATES.values() for c in members) == sorted(SUGARCREPE_CATEGORIES)


def test_sugarcrepe_missing_category_file_is_named(sugarcrepe):
    json_dir, images = sugarcrepe
    with pytest.raises(FileNotFoundError, match=r"sugar_crepe/replace_obj\.json is missing"):
        read_sugarcrepe(json_dir, images)


def test_sugarcrepe_bad_record_names_file_and_key(sugarcrepe):
    json_dir, images = sugarcrepe
    broken = json.loads(json.dumps(SUGARCREPE["swap_obj"]))
    del broken["109"]["negative_caption"]
    write_json(json_dir / "swap_obj.json", broken)
    with pytest.raises(CompositionalFormatError, match=r"swap_obj\.json: item '109' has no 'negative_caption'"):
        read_sugarcrepe(json_dir, images, categories=CATEGORIES)
    write_json(json_dir / "swap_obj.json", list(SUGARCREPE["swap_obj"].values()))
    with pytest.raises(DataFormatError, match=r"swap_obj\.json: expected a JSON object"):
        read_sugarcrepe(json_dir, images, categories=CATEGORIES)


def test_sugarcrepe_missing_image_errors_or_is_skipped_and_counted(sugarcrepe):
    json_dir, images = sugarcrepe
    (images / "000000007816.jpg").unlink()
    with pytest.raises(MissingImageError, match="000000007816.jpg"):
        read_sugarcrepe(json_dir, images, categories=CATEGORIES)
    frame = read_sugarcrepe(json_dir, images, categories=CATEGORIES, on_missing_image="skip")
    assert "swap_obj:109" not in set(frame["item_id"]) and len(frame) == 4
    assert frame.attrs["dropped"]["missing_image"] == 1


# --------------------------------------------------------------------------------------------------------
# ARO: VG-Relation / VG-Attribution


@pytest.fixture
def aro_images(tmp_path):
    return touch_images(tmp_path / "aro" / "images", ["2338864.jpg", "2410513.jpg"])


def test_vg_relation_items_crop_and_group_by_relation(tmp_path, aro_images):
    frame = read_vg_relation(write_json(tmp_path / "visual_genome_relation.json", VG_RELATION), aro_images)
    assert tuple(frame.columns) == ITEM_COLUMNS
    assert list(frame["subset"]) == ["vg_relation:sitting on", "vg_relation:near"]
    assert list(frame["item_id"]) == ["vg_relation:0", "vg_relation:1"]
    assert frame.iloc[0]["bbox"] == [14.0, 30.0, 401.0, 290.0]
    assert frame.iloc[1]["bbox"] == [0.5, 12.0, 333.0, 250.25]
    assert list(frame["vg_id"]) == [2338864, 2410513]  # a string or an integer in the file
    assert frame.iloc[0]["positive"] == "the man is sitting on the bench"
    assert frame.iloc[0]["negatives"] == ["the bench is sitting on the man"]
    assert frame.iloc[0]["image_path"] == str(aro_images / "2338864.jpg")
    assert set(frame["benchmark"]) == {"aro"} and frame["coco_id"].isna().all()


def test_vg_attribution_groups_by_ordered_attribute_pair(tmp_path, aro_images):
    frame = read_vg_attribution(write_json(tmp_path / "visual_genome_attribution.json", VG_ATTRIBUTION), aro_images)
    assert list(frame["subset"]) == ["vg_attribution:white_black"]
    assert frame.iloc[0]["negatives"] == ["the black plate and the white table"]


def test_vg_id_falls_back_to_the_image_name_and_empty_boxes_are_skipped(tmp_path, aro_images):
    records = [dict(VG_RELATION[0]), dict(VG_RELATION[1], bbox_w=0)]
    del records[0]["image_id"]
    frame = read_vg_relation(write_json(tmp_path / "rel.json", records), aro_images)
    assert list(frame["vg_id"]) == [2338864]
    assert frame.attrs["dropped"] == {"degenerate_bbox": 1, "missing_image": 0}


@pytest.mark.parametrize(("change", "message"), [
    ({"bbox_h": "250"}, r"test case #1: 'bbox_h' must be a number"),
    ({"relation_name": None}, r"test case #1: 'relation_name' must be a string"),
    ({"image_id": True}, r"test case #1: 'image_id' must be an integer"),
])
def test_vg_bad_records_name_file_and_case(tmp_path, aro_images, change, message):
    path = write_json(tmp_path / "visual_genome_relation.json", [VG_RELATION[0], {**VG_RELATION[1], **change}])
    with pytest.raises(CompositionalFormatError, match=r"visual_genome_relation\.json: " + message):
        read_vg_relation(path, aro_images)


def test_vg_attribution_needs_two_attributes(tmp_path, aro_images):
    path = write_json(tmp_path / "attr.json", [{**VG_ATTRIBUTION[0], "attributes": ["white"]}])
    with pytest.raises(CompositionalFormatError, match=r"attr\.json: test case #0: 'attributes' must hold two"):
        read_vg_attribution(path, aro_images)


def test_malformed_json_names_the_file(tmp_path, aro_images):
    path = tmp_path / "visual_genome_relation.json"
    path.write_text('[{"image_id": 1,', encoding="utf-8")
    with pytest.raises(CompositionalFormatError, match=r"visual_genome_relation\.json: malformed JSON at line 1"):
        read_vg_relation(path, aro_images)


# --------------------------------------------------------------------------------------------------------
# ARO: word-order perturbations

CAPTION = "A young man riding a red horse on the beach."


def words(text: str) -> Counter:
    return Counter(text.split())


def test_pre_caption_is_blips():
    assert aro_pre_caption("A man with a red helmet on a small moped on a dirt road. ") == \
        "a man with a red helmet on a small moped on a dirt road"
    assert aro_pre_caption('He said: "go!"  (now)') == "he said go now"
    assert aro_pre_caption("one two three four", max_words=2) == "one two"


def test_tokenizer_and_heuristic_tagger_on_a_caption():
    assert tokenize_caption("The dog's toy isn't red.") == ["The", "dog", "'s", "toy", "is", "n't", "red", "."]
    tags = dict(heuristic_pos_tagger(CAPTION))
    assert [t for t in ("man", "horse", "beach") if tags[t].startswith("NN")] == ["man", "horse", "beach"]
    assert tags["young"] == tags["red"] == "JJ"
    assert not any(tags[t].startswith(("NN", "JJ")) for t in ("A", "riding", "a", "on", "the", "."))


PERTURBATIONS = [shuffle_nouns_and_adjectives, shuffle_all_but_nouns_and_adjectives, shuffle_within_trigrams,
                 shuffle_trigrams]


@pytest.mark.parametrize("perturb", PERTURBATIONS)
def test_perturbations_are_seeded_permutations_that_change_the_caption(perturb):
    first = perturb(CAPTION, np.random.default_rng(3))
    assert first == perturb(CAPTION, np.random.default_rng(3))
    assert words(first) == Counter(tokenize_caption(CAPTION))
    for seed in range(20):  # a differing arrangement exists, so every draw differs from the caption
        assert aro_pre_caption(perturb(CAPTION, np.random.default_rng(seed))) != aro_pre_caption(CAPTION)
    assert len({perturb(CAPTION, np.random.default_rng(seed)) for seed in range(20)}) > 1


@pytest.mark.parametrize("perturb", PERTURBATIONS)
def test_perturbations_leave_a_caption_with_nothing_to_permute_alone(perturb):
    assert perturb("dogs", np.random.default_rng(0)) == "dogs"


def test_noun_and_adjective_shuffles_move_only_their_classes():
    tagged = heuristic_pos_tagger(CAPTION)
    tokens = [token for token, _ in tagged]
    content = [tag.startswith(("NN", "JJ")) for _, tag in tagged]
    for seed in range(10):
        swapped = shuffle_nouns_and_adjectives(CAPTION, np.random.default_rng(seed)).split()
        assert [t for t, c in zip(swapped, content) if not c] == [t for t, c in zip(tokens, content) if not c]
        assert {swapped[tokens.index("young")], swapped[tokens.index("red")]} == {"young", "red"}
        rest = shuffle_all_but_nouns_and_adjectives(CAPTION, np.random.default_rng(seed)).split()
        assert [t for t, c in zip(rest, content) if c] == [t for t, c in zip(tokens, content) if c]


def test_trigram_shuffles_keep_or_move_whole_trigrams():
    tokens = tokenize_caption(CAPTION)  # 10 tokens: 3 + 3 + 3 + 1
    chunks = [tokens[k:k + 3] for k in range(0, len(tokens), 3)]
    for seed in range(10):
        within = shuffle_within_trigrams(CAPTION, np.random.default_rng(seed)).split()
        assert [Counter(within[k:k + 3]) for k in range(0, 10, 3)] == [Counter(c) for c in chunks]
        moved = shuffle_trigrams(CAPTION, np.random.default_rng(seed)).split()
        assert sorted(" ".join(moved).count(" ".join(c)) for c in chunks) == [1, 1, 1, 1]


# What the four perturbations make of "a red car near a blue bus" with numpy.random.default_rng(0).
EXPECTED_NOUNS_ADJ = "a blue car near a red bus"
EXPECTED_ALL_BUT = "a red car a near blue bus"
EXPECTED_WITHIN = "car a red blue a near bus"
EXPECTED_TRIGRAMS = "bus a red car near a blue"


def test_perturbations_exact_output_on_a_fixed_seed():
    caption = "a red car near a blue bus"
    assert shuffle_nouns_and_adjectives(caption, np.random.default_rng(0)) == EXPECTED_NOUNS_ADJ
    assert shuffle_all_but_nouns_and_adjectives(caption, np.random.default_rng(0)) == EXPECTED_ALL_BUT
    assert shuffle_within_trigrams(caption, np.random.default_rng(0)) == EXPECTED_WITHIN
    assert shuffle_trigrams(caption, np.random.default_rng(0)) == EXPECTED_TRIGRAMS


def test_the_source_of_the_perturbations_is_stated():
    assert "built here" in ORDER_PERTURBATIONS_SOURCE and "seeded" in ORDER_PERTURBATIONS_SOURCE


def test_without_redraws_a_perturbation_may_equal_the_caption():
    # "a man": one noun, so the noun shuffle is the identity, as ARO's own code would draw it.
    rng = np.random.default_rng(0)
    assert order_negatives("a man", rng, ensure_different=False)[0] == "a man"


# --------------------------------------------------------------------------------------------------------
# ARO: COCO-Order / Flickr30k-Order


@pytest.fixture
def coco_order(tmp_path):
    path = write_json(tmp_path / "coco_karpathy_test.json", COCO_KARPATHY)
    return path, touch_images(tmp_path / "coco", [COCO_KARPATHY[0]["image"]])


def test_order_items_one_per_caption_with_aros_perturbations(coco_order):
    path, images = coco_order
    frame = read_order_captions(path, images, benchmark_subset="coco_order", seed=1, collection="coco")
    assert tuple(frame.columns) == ITEM_COLUMNS
    assert len(frame) == 5 and list(frame["item_id"])[:2] == ["coco_order:0:0", "coco_order:0:1"]
    assert set(frame["subset"]) == {"coco_order"} and set(frame["benchmark"]) == {"aro"}
    assert set(frame["coco_id"]) == {391895} and frame["flickr_id"].isna().all()
    assert frame.iloc[0]["image_path"] == str(images / "val2014/COCO_val2014_000000391895.jpg")
    assert frame.iloc[0]["positive"] == "a man with a red helmet on a small moped on a dirt road"
    for _, item in frame.iterrows():
        assert 1 <= len(item["negatives"]) <= 4 and item["positive"] not in item["negatives"]
        for negative in item["negatives"]:
            assert len(negative.split()) <= 30
    assert frame.iloc[3]["positive"].endswith("a background of cloud-wreathed mountains")  # 28 words: all kept


def test_order_negatives_are_seeded_per_caption(coco_order):
    path, images = coco_order
    kwargs = dict(benchmark_subset="coco_order", collection="coco")
    first = read_order_captions(path, images, seed=1, **kwargs)
    again = read_order_captions(path, images, seed=1, **kwargs)
    other = read_order_captions(path, images, seed=2, **kwargs)
    assert list(first["negatives"]) == list(again["negatives"])
    assert list(first["negatives"]) != list(other["negatives"])
    one = order_negatives(COCO_KARPATHY[0]["caption"][2], np.random.default_rng([1, 0, 2]), ensure_different=False)
    expected = [n for n in (aro_pre_caption(p) for p in one) if n != first.iloc[2]["positive"]]
    assert first.iloc[2]["negatives"] == expected


def test_flickr_order_reads_flickr_ids(tmp_path):
    path = write_json(tmp_path / "flickr30k_test.json", FLICKR_KARPATHY)
    images = touch_images(tmp_path / "flickr", [FLICKR_KARPATHY[0]["image"]])
    frame = read_order_captions(path, images, benchmark_subset="flickr30k_order", seed=0, collection="flickr30k",
                                redraw_identical=True)
    assert len(frame) == 5 and set(frame["flickr_id"]) == {1007129816} and frame["coco_id"].isna().all()
    assert all(len(n) == 4 for n in frame["negatives"])  # redrawn, so none equals its caption
    assert frame.attrs["dropped"]["identical_negative"] == 0


def test_order_captions_are_truncated_to_30_words_after_perturbation(tmp_path):
    caption = " ".join(f"word{k}" for k in range(40)) + "."
    records = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": [caption]}]
    path = write_json(tmp_path / "coco_karpathy_test.json", records)
    images = touch_images(tmp_path / "coco", [records[0]["image"]])
    item = read_order_captions(path, images, benchmark_subset="coco_order", seed=0, collection="coco").iloc[0]
    assert item["positive"] == " ".join(f"word{k}" for k in range(30))
    assert [len(n.split()) for n in item["negatives"]] == [30] * len(item["negatives"])


def test_order_captions_with_no_distinct_negative_are_dropped_and_counted(tmp_path):
    records = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["Dogs.", "A dog runs."]}]
    path = write_json(tmp_path / "coco_karpathy_test.json", records)
    images = touch_images(tmp_path / "coco", [records[0]["image"]])
    frame = read_order_captions(path, images, benchmark_subset="coco_order", seed=0, collection="coco")
    assert list(frame["item_id"]) == ["coco_order:0:1"]
    assert frame.attrs["dropped"]["no_distinct_negative"] == 1
    assert frame.attrs["dropped"]["identical_negative"] >= 4


@pytest.mark.parametrize(("record", "message"), [
    ({"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "A man on a moped."},
     r"image #0: 'caption' must be a list of strings"),
    ({"image": "val2014/391895.png", "caption": ["A man."]}, r"image #0: image name 'val2014/391895.png'"),
    ({"caption": ["A man."]}, r"image #0 has no 'image' field"),
])
def test_order_bad_records_name_file_and_record(tmp_path, record, message):
    path = write_json(tmp_path / "coco_karpathy_test.json", [record])
    with pytest.raises(CompositionalFormatError, match=r"coco_karpathy_test\.json: " + message):
        read_order_captions(path, tmp_path, benchmark_subset="coco_order", seed=0, collection="coco")


def test_order_refuses_an_unknown_collection(coco_order):
    path, images = coco_order
    with pytest.raises(ValueError, match="collection"):
        read_order_captions(path, images, benchmark_subset="coco_order", seed=0, collection="coco2017")


# --------------------------------------------------------------------------------------------------------
# Winoground


@pytest.fixture
def winoground(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in WINOGROUND), encoding="utf-8")
    names = [f"{r[key]}.png" for r in WINOGROUND for key in ("image_0", "image_1")]
    return path, touch_images(tmp_path / "images", names)


def test_winoground_rows_resolve_png_images(winoground):
    path, images = winoground
    frame = read_winoground(path, images)
    assert tuple(frame.columns) == WINOGROUND_COLUMNS
    assert list(frame["item_id"]) == [0, 3, 4]
    assert frame.iloc[0]["image_0"] == str(images / "ex_0_img_0.png")
    assert frame.iloc[2]["image_1"] == str(images / "ex_4_img_1.png")
    assert frame.iloc[2]["caption_0"] == "the person without earrings pays the person with earrings"
    assert list(frame["collapsed_tag"]) == ["Relation", "Object", "Relation"]
    assert list(frame["secondary_tag"]) == ["", "", "Morpheme-Level"]
    assert list(frame["num_main_preds"]) == [1, 1, 1]


def test_winoground_bad_lines_name_file_and_line(winoground):
    path, images = winoground
    lines = [json.dumps(r) for r in WINOGROUND]
    lines[1] = json.dumps({k: v for k, v in WINOGROUND[1].items() if k != "caption_1"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CompositionalFormatError, match=r"examples\.jsonl: line 2 \(id 3\) has no 'caption_1'"):
        read_winoground(path, images)
    path.write_text(json.dumps(WINOGROUND[0]) + "\n" + json.dumps(WINOGROUND[0]) + "\n", encoding="utf-8")
    with pytest.raises(CompositionalFormatError, match=r"examples\.jsonl: example ids appear more than once: \[0\]"):
        read_winoground(path, images)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(CompositionalFormatError, match=r"examples\.jsonl: line 1: malformed JSON"):
        read_winoground(path, images)


def test_winoground_missing_image_drops_the_example_under_skip(winoground):
    path, images = winoground
    (images / "ex_3_img_1.png").unlink()
    frame = read_winoground(path, images, on_missing_image="skip")
    assert list(frame["item_id"]) == [0, 4] and frame.attrs["dropped"] == {"missing_image": 1}


def test_winoground_scores_follow_the_paper():
    # s[c][i]: caption c, image i
    all_right = [[0.9, 0.1], [0.2, 0.8]]
    text_only = [[0.5, 0.6], [0.4, 0.7]]  # c0 prefers i1 (image score fails), each image prefers its caption
    image_only = [[0.5, 0.1], [0.6, 0.7]]  # i0 prefers c1 (text score fails), each caption prefers its image
    neither = [[0.1, 0.9], [0.8, 0.2]]
    tie = [[0.5, 0.5], [0.5, 0.5]]
    scores = winoground_scores([all_right, text_only, image_only, neither, tie])
    assert scores["text_score"].tolist() == [True, True, False, False, False]
    assert scores["image_score"].tolist() == [True, False, True, False, False]
    assert scores["group_score"].tolist() == [True, False, False, False, False]
    single = winoground_scores(all_right)
    assert bool(single["group_score"]) is True
    with pytest.raises(ValueError, match="shape"):
        winoground_scores(np.zeros((3, 2, 3)))


# --------------------------------------------------------------------------------------------------------
# Visual Genome image list


def test_vg_image_data_ids(tmp_path):
    frame = read_vg_image_data(write_json(tmp_path / "image_data.json", VG_IMAGE_DATA))
    assert list(frame.columns) == ["vg_id", "coco_id", "flickr_id"]
    assert all(str(frame[c].dtype) == "Int64" for c in frame.columns)
    assert list(frame["vg_id"]) == [1, 2, 51]
    assert frame["coco_id"].isna().tolist() == [True, True, False] and frame["coco_id"].iloc[2] == 391895
    assert frame["flickr_id"].iloc[2] == 1007129816


def test_vg_image_data_bad_records_name_file_and_image(tmp_path):
    records = [VG_IMAGE_DATA[0], {k: v for k, v in VG_IMAGE_DATA[2].items() if k != "flickr_id"}]
    with pytest.raises(CompositionalFormatError, match=r"image_data\.json: image 51 has no 'flickr_id'"):
        read_vg_image_data(write_json(tmp_path / "image_data.json", records))
    with pytest.raises(CompositionalFormatError, match=r"image_data\.json: image ids appear more than once"):
        read_vg_image_data(write_json(tmp_path / "image_data.json", [VG_IMAGE_DATA[0]] * 2))


# --------------------------------------------------------------------------------------------------------
# Accuracies


def test_micro_and_macro_accuracy_on_known_cases():
    correct = [True, True, False, False, True]
    groups = ["a", "a", "a", "a", "b"]
    assert micro_accuracy(correct) == pytest.approx(0.6)
    assert macro_accuracy(correct, groups) == pytest.approx((0.5 + 1.0) / 2)
    assert macro_accuracy(correct, groups, exclude=["b"]) == pytest.approx(0.5)
    assert macro_accuracy(correct, groups, min_count=2) == pytest.approx(0.5)
    table = group_accuracies(correct, groups)
    assert table.loc["a"].tolist() == [0.5, 4] and table.loc["b"].tolist() == [1.0, 1]
    with pytest.raises(ValueError, match="no group"):
        macro_accuracy(correct, groups, min_count=5)
    with pytest.raises(ValueError, match="no items"):
        micro_accuracy([])


def test_aro_macro_accuracy_applies_aros_exclusions():
    assert "near" in ARO_VG_RELATION_EXCLUDED and "on" not in ARO_VG_RELATION_EXCLUDED
    assert len(ARO_VG_RELATION_EXCLUDED) == 157 and ARO_VG_ATTRIBUTION_MIN_COUNT == 25
    subsets = (["vg_relation:on"] * 4 + ["vg_relation:sitting on"] * 2 + ["vg_relation:near"] * 3
               + ["vg_attribution:white_black"] * 25 + ["vg_attribution:red_blue"] * 24 + ["coco_order"] * 2)
    correct = ([True, True, True, False] + [True, False] + [False] * 3
               + [True] * 20 + [False] * 5 + [False] * 24 + [True, True])
    result = aro_macro_accuracy(correct, subsets)
    assert result["vg_relation"] == pytest.approx((0.75 + 0.5) / 2)  # "near" is excluded
    assert result["vg_attribution"] == pytest.approx(0.8)  # red_blue has 24 < 25 items
    assert set(result) == {"vg_relation", "vg_attribution"}
    assert aro_macro_accuracy([True], ["vg_relation:on"]) == {"vg_relation": 1.0}


def test_item_tables_concatenate(tmp_path, sugarcrepe, aro_images):
    json_dir, images = sugarcrepe
    both = pd.concat([read_sugarcrepe(json_dir, images, categories=CATEGORIES),
                      read_vg_relation(write_json(tmp_path / "rel.json", VG_RELATION), aro_images)],
                     ignore_index=True)
    assert both["item_id"].is_unique and str(both["vg_id"].dtype) == "Int64"
