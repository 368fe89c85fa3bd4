"""HNC readers and shard writer on hand-written records in both of HNC's real shapes."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from hnclip.data import MissingImageError
from hnclip.data import hnc
from hnclip.data.hnc import (
    TEST_SKIP_REASONS,
    TEST_TYPE_EQUIVALENTS,
    HNCFormatError,
    read_pair_shards,
    read_pairs,
    shard_of,
    type_group,
    write_pair_shards,
)


def bbox(name: str) -> dict:
    return {"bbox": {"x": 10, "y": 20, "w": 30, "h": 40}, "name": name}


def train_record(caption: str, label: int, type_name: str, cpt_p_id: int | None) -> dict:
    """A record with every field of the real train/val shape (docs/data.md)."""
    return {
        "caption": caption,
        "label": label,
        "type": type_name,
        "textual_label": "straw",
        "bboxes": {"3095837": bbox("plate"), "3095838": bbox("straw")},
        "ambiguity": {"plate": False},
        "noisy": None,
        "replaced": ["straw", "plate"],
        "cpt_p_id": cpt_p_id,
    }


# Train/val shape. Image 2354786: a normal pair (negative padded with spaces), a counting pair, an
# identical pair (differs only in case/space), a repeat of the first pair, and an unpaired positive.
# Image 2400001: a negative listed before its positive, and a logic pair.
TRAIN = {
    "2354786": {
        "captions": {
            "0": train_record("The yellow plate is to the left of the straw.", 1, "attribute_subg", None),
            "1": train_record("  The red plate is to the left of the straw. ", 0, "attribute_subg", 0),
            "2": train_record("There are two cups.", 1, "obj_count", None),
            "3": train_record("There are three cups.", 0, "obj_count", 2),
            "4": train_record("The man is near the car.", 1, "relation_pred", None),
            "5": train_record("the man is near the car. ", 0, "relation_pred", 4),
            "6": train_record("The yellow plate is to the left of the straw.", 1, "attribute_subg", None),
            "7": train_record("The red plate is to the left of the straw.", 0, "attribute_subg", 6),
            "8": train_record("The straw is white.", 1, "attribute", None),
        }
    },
    "2400001": {
        "captions": {
            "10": train_record("The car is behind the dog.", 0, "relation_subj", 11),
            "11": train_record("The dog is behind the car.", 1, "relation_subj", None),
            "12": train_record("Either the cat is black or the dog is white.", 1, "xor_logic_attr", None),
            "13": train_record("Either the cat is white or the dog is white.", 0, "xor_logic_attr", 12),
        }
    },
}

TRAIN_EXPECTED = [
    # image_id, positive, negative, type, type_group, positive_id, negative_id
    ("2354786", "The yellow plate is to the left of the straw.", "The red plate is to the left of the straw.",
     "attribute_subg", "attribute", "0", "1"),
    ("2354786", "There are two cups.", "There are three cups.", "obj_count", "counting", "2", "3"),
    ("2400001", "The dog is behind the car.", "The car is behind the dog.", "relation_subj", "relation", "11", "10"),
    ("2400001", "Either the cat is black or the dog is white.", "Either the cat is white or the dog is white.",
     "xor_logic_attr", "logic", "12", "13"),
]


def positional_record(caption: str, label: int, type_name: str) -> dict:
    return {"caption": caption, "label": label, "type": type_name, "replaced": ["a", "b"]}


# Test shape: .jpg keys, no wrapper, positional pairs; hand-typed captions (no final period, spaces).
# n200001's keys are out of order; its "2"/"3" pair is identical after strip + lower.
TEST = {
    "n100552.jpg": {
        "0": positional_record("A man is holding an umbrella ", 1, "relation"),
        "1": positional_record("An umbrella is holding a man", 0, "relation"),
        "2": positional_record("There are two dogs.", 1, "object_count"),
        "3": positional_record("There are four dogs.", 0, "object_count"),
    },
    "n200001.jpg": {
        "1": positional_record("The shirt is not red", 0, "verify_object_attribute"),
        "0": positional_record("The shirt is red", 1, "verify_object_attribute"),
        "3": positional_record(" a white sign.", 0, "attribute_relation"),
        "2": positional_record("A white sign.", 1, "attribute_relation"),
    },
}

TEST_EXPECTED = [
    ("n100552", "A man is holding an umbrella", "An umbrella is holding a man", "relation", "relation", "0", "1"),
    ("n100552", "There are two dogs.", "There are four dogs.", "object_count", "counting", "2", "3"),
    ("n200001", "The shirt is red", "The shirt is not red", "verify_object_attribute", "counting", "0", "1"),
]

COLUMNS = ["image_id", "positive", "negative", "type", "type_group", "positive_id", "negative_id"]


def write(tmp_path: Path, data, name: str = "hnc.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def as_rows(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(row) for row in frame[COLUMNS].itertuples(index=False)]


def make_images(images_dir: Path, image_ids) -> Path:
    images_dir.mkdir(exist_ok=True)
    for image_id in image_ids:
        (images_dir / f"{image_id}.jpg").write_bytes(b"\xff\xd8jpeg")
    return images_dir


# ---------------------------------------------------------------------------------------------------------
# read_pairs


def test_read_pairs_train_shape_gives_every_column_and_drops_defects(tmp_path):
    frame = read_pairs(write(tmp_path, TRAIN))
    assert list(frame.columns) == COLUMNS
    assert as_rows(frame) == TRAIN_EXPECTED
    stats = frame.attrs["stats"]
    assert stats["dropped"] == {"identical_pair": 1, "duplicate_pair": 1, "missing_image": 0}
    assert stats["shape"] == "train_val"
    assert stats["positives_without_negative"] == 1  # caption "8"
    assert stats["pairs_per_type"] == {"attribute_subg": 1, "obj_count": 1, "relation_subj": 1, "xor_logic_attr": 1}
    assert stats["pairs_per_group"] == {"attribute": 1, "relation": 1, "counting": 1, "logic": 1}
    assert (stats["images"], stats["pairs"]) == (2, 4)


def test_read_pairs_test_shape_pairs_by_position(tmp_path):
    frame = read_pairs(write(tmp_path, TEST))
    assert as_rows(frame) == TEST_EXPECTED
    assert frame.attrs["stats"]["shape"] == "test"
    assert frame.attrs["stats"]["dropped"]["identical_pair"] == 1


def test_test_shape_orders_caption_ids_numerically(tmp_path):
    # 12 captions: lexicographic order would pair "10" with "11" after "1", scrambling the pairs.
    records = {}
    for i in range(6):
        records[str(2 * i)] = positional_record(f"There are {i} cups.", 1, "object_count")
        records[str(2 * i + 1)] = positional_record(f"There are {i + 10} cups.", 0, "object_count")
    shuffled = dict(sorted(records.items(), key=lambda kv: hashlib.md5(kv[0].encode()).hexdigest()))
    frame = read_pairs(write(tmp_path, {"n1.jpg": shuffled}))
    expected = [(f"There are {i} cups.", f"There are {i + 10} cups.", str(2 * i), str(2 * i + 1)) for i in range(6)]
    got = frame[["positive", "negative", "positive_id", "negative_id"]].itertuples(index=False)
    assert [tuple(row) for row in got] == expected


GROUP_OF_TRAIN_TYPE = {  # docs/data.md's grouping, written out independently of the library's table
    "attribute": ["attribute", "object", "attribute_subg"],
    "relation": ["relation_subj", "relation_obj", "relation_pred", "relation_attr_subj", "relation_attr_obj",
                 "relation_attr_pred"],
    "counting": ["obj_count", "obj_comp_count", "obj_verify_count", "obj_verify_count_attr"],
    "logic": ["and_logic_attr", "and_logic_rel", "xor_logic_attr", "xor_logic_rel"],
}
GROUP_OF_TEST_TYPE = {
    "relation": "relation", "xor_logic_relation": "logic", "xor_logic_attribute": "logic",
    "verify_object_attribute": "counting", "and_logic_relation": "logic", "relation_attribute": "relation",
    "verify_object_relation": "counting", "object_count": "counting", "object_compare_count": "counting",
    "attribute_relation": "attribute",
}


def test_type_groups_follow_data_spec():
    train_types = [t for types in GROUP_OF_TRAIN_TYPE.values() for t in types]
    assert sorted(hnc.TYPE_GROUPS) == sorted(train_types) and len(train_types) == 17
    for group, types in GROUP_OF_TRAIN_TYPE.items():
        assert {type_group(t) for t in types} == {group}
    assert {t: type_group(t) for t in GROUP_OF_TEST_TYPE} == GROUP_OF_TEST_TYPE
    with pytest.raises(KeyError, match="unknown HNC type 'colour'"):
        type_group("colour")


# ---------------------------------------------------------------------------------------------------------
# write_pair_shards


def many_images(n_images: int) -> dict:
    return {
        str(1000 + i): {
            "captions": {
                str(2 * j): train_record(f"Image {i}: the cup {j} is red.", 1, "attribute", None)
                for j in range(3)
            } | {
                str(2 * j + 1): train_record(f"Image {i}: the cup {j} is blue.", 0, "attribute", 2 * j)
                for j in range(3)
            }
        }
        for i in range(n_images)
    }


def read_shards(out_dir: Path, n_shards: int) -> list[pd.DataFrame]:
    return [pq.read_table(out_dir / f"part-{k:05d}.parquet").to_pandas() for k in range(n_shards)]


def test_shards_hold_whole_images_and_their_union_is_read_pairs(tmp_path):
    path = write(tmp_path, many_images(40) | TRAIN)
    stats = write_pair_shards(path, tmp_path / "shards", n_shards=5, progress=False)
    shards = read_shards(tmp_path / "shards", 5)
    for k, shard in enumerate(shards):
        for image_id in shard["image_id"].unique():
            assert shard_of(image_id, 5) == k
    images_per_shard = [set(s["image_id"]) for s in shards]
    assert sum(len(s) for s in images_per_shard) == len(set().union(*images_per_shard)) == 42  # disjoint
    union = pd.concat(shards, ignore_index=True)
    whole = read_pairs(path)
    key = ["image_id", "negative_id"]
    pd.testing.assert_frame_equal(
        union.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True)
    )
    assert stats["pairs_per_shard"] == [len(s) for s in shards]
    pd.testing.assert_frame_equal(read_pair_shards(tmp_path / "shards"), union)


def test_shard_of_is_a_stable_hash():
    # Literal values: a change of hash would silently reshuffle existing shard directories.
    assert [shard_of(i, 7) for i in ["2354786", "2400001", "n100552", "0", "1"]] == [3, 1, 1, 2, 2]
    assert [shard_of(i, 64) for i in ["2354786", "2400001", "n100552"]] == [45, 12, 15]
    expected = int.from_bytes(hashlib.blake2b(b"2354786", digest_size=8).digest(), "big") % 7
    assert shard_of("2354786", 7) == expected  # blake2b-64 of the UTF-8 id, modulo n_shards
    assert [shard_of(str(i), 1) for i in range(5)] == [0] * 5


def test_every_shard_is_written_even_if_empty_with_the_schema(tmp_path):
    path = write(tmp_path, TEST)
    write_pair_shards(path, tmp_path / "shards", n_shards=9, progress=False)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == [f"part-{k:05d}.parquet" for k in range(9)] + ["stats.json"]
    schemas = {str(pq.read_schema(tmp_path / "shards" / n)) for n in names if n.endswith(".parquet")}
    assert schemas == {str(hnc.pair_schema(False))}
    assert sum(pq.read_metadata(tmp_path / "shards" / n).num_rows for n in names[:-1]) == 3
    assert any(pq.read_metadata(tmp_path / "shards" / n).num_rows == 0 for n in names[:-1])


def test_stats_json_counts_and_provenance(tmp_path):
    path = write(tmp_path, TRAIN)
    write_pair_shards(path, tmp_path / "shards", n_shards=2, progress=False)
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stats["input_bytes"] == path.stat().st_size
    assert stats["pairs"] == 4 and stats["images"] == 2 and stats["n_shards"] == 2
    assert stats["pairs_per_type"] == {"attribute_subg": 1, "obj_count": 1, "relation_subj": 1, "xor_logic_attr": 1}
    assert stats["pairs_per_group"] == {"attribute": 1, "relation": 1, "counting": 1, "logic": 1}
    assert stats["dropped"] == {"identical_pair": 1, "duplicate_pair": 1, "missing_image": 0}
    assert {"git_commit", "versions", "created"} <= set(stats["provenance"])


def test_small_row_groups_give_the_same_rows(tmp_path, monkeypatch):
    # Force a flush after every image: the streamed path with many row groups must not lose or reorder rows.
    monkeypatch.setattr(hnc, "_MIN_ROWS_PER_GROUP", 1)
    monkeypatch.setattr(hnc, "_BUFFERED_ROWS_BUDGET", 1)
    path = write(tmp_path, many_images(12))
    write_pair_shards(path, tmp_path / "shards", n_shards=2, progress=False)
    groups = sum(pq.read_metadata(tmp_path / "shards" / f"part-{k:05d}.parquet").num_row_groups for k in range(2))
    assert groups == 12
    union = pd.concat(read_shards(tmp_path / "shards", 2), ignore_index=True)
    assert sorted(as_rows(union)) == sorted(as_rows(read_pairs(path)))


def test_conversion_never_loads_the_whole_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("json.load/json.loads must not be used on HNC files")

    monkeypatch.setattr(json, "load", refuse)
    monkeypatch.setattr(json, "loads", refuse)
    path = tmp_path / "hnc.json"
    path.write_text(json.JSONEncoder().encode(TRAIN))
    assert write_pair_shards(path, tmp_path / "shards", n_shards=2, progress=False)["pairs"] == 4


# ---------------------------------------------------------------------------------------------------------
# Images


def test_image_path_column_when_images_dir_given(tmp_path):
    images = make_images(tmp_path / "images", ["2354786", "2400001"])
    frame = read_pairs(write(tmp_path, TRAIN), images_dir=images)
    assert list(frame["image_path"]) == [str(images / f"{i}.jpg") for i, *_ in TRAIN_EXPECTED]
    write_pair_shards(write(tmp_path, TRAIN), tmp_path / "shards", n_shards=3, images_dir=images, progress=False)
    union = pd.concat(read_shards(tmp_path / "shards", 3))
    assert set(union["image_path"]) == {str(images / "2354786.jpg"), str(images / "2400001.jpg")}


def test_missing_image_is_an_error_naming_the_file(tmp_path):
    images = make_images(tmp_path / "images", ["n100552"])
    with pytest.raises(MissingImageError, match=r"image n200001\.jpg referenced by .*hnc\.json is missing"):
        write_pair_shards(write(tmp_path, TEST), tmp_path / "shards", n_shards=2, images_dir=images, progress=False)
    assert not (tmp_path / "shards").exists()


def test_missing_image_skip_counts_and_drops_its_pairs(tmp_path):
    images = make_images(tmp_path / "images", ["n100552"])
    stats = write_pair_shards(
        write(tmp_path, TEST), tmp_path / "shards", n_shards=2, images_dir=images,
        on_missing_image="skip", progress=False,
    )
    assert stats["missing_images"] == ["n200001.jpg"]
    assert stats["dropped"]["missing_image"] == 1  # its one non-degenerate pair
    assert stats["pairs"] == 2 and stats["images"] == 1
    assert set(read_pair_shards(tmp_path / "shards")["image_id"]) == {"n100552"}


def test_missing_images_dir_and_bad_policy_are_refused(tmp_path):
    with pytest.raises(MissingImageError, match="images directory .*nowhere does not exist"):
        read_pairs(write(tmp_path, TEST), images_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="on_missing_image must be one of"):
        read_pairs(write(tmp_path, TEST), on_missing_image="ignore")


# ---------------------------------------------------------------------------------------------------------
# Bad input


def mutated(data: dict, edit) -> dict:
    data = copy.deepcopy(data)
    edit(data)
    return data


TRAIN_CAPTIONS = lambda d, image="2354786": d[image]["captions"]  # noqa: E731
BAD_INPUTS = {
    "missing caption": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["3"].pop("caption"),
                        r"image '2354786', caption '3': record has no 'caption' field"),
    "missing label": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["2"].pop("label"),
                      r"image '2354786', caption '2': record has no 'label' field"),
    "label 2": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["1"].update(label=2),
                r"caption '1': 'label' must be 0 \(hard negative\) or 1 \(positive\), got 2"),
    "label true": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["1"].update(label=True),
                   r"caption '1': 'label' must be 0 .* got True"),
    "empty caption": (TRAIN, lambda d: TRAIN_CAPTIONS(d, "2400001")["12"].update(caption="   "),
                      r"image '2400001', caption '12': empty caption"),
    "caption not a string": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["0"].update(caption=7),
                             r"caption '0': 'caption' must be a string, got 7"),
    "unknown type": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["0"].update(type="colour"),
                     r"caption '0': unknown type 'colour'"),
    "negative without positive": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["3"].update(cpt_p_id=99),
                                  r"image '2354786', caption '3': cpt_p_id 99 names no caption .* has no positive"),
    "negative without link": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["3"].update(cpt_p_id=None),
                              r"caption '3': hard negative without 'cpt_p_id'"),
    "link to a negative": (TRAIN, lambda d: TRAIN_CAPTIONS(d)["3"].update(cpt_p_id=1),
                           r"caption '3': cpt_p_id 1 names caption '1', which is not a positive"),
    "test caption id not an int": (TEST, lambda d: d["n100552.jpg"].update(x=d["n100552.jpg"].pop("3")),
                                   r"image 'n100552': test caption ids must be integers"),
    "shapes mixed": (TRAIN, lambda d: d.update({"n1.jpg": TEST["n100552.jpg"]}),
                     r"image 'n1.jpg' has the test shape, earlier images the train_val shape"),
    "record not an object": (TRAIN, lambda d: TRAIN_CAPTIONS(d).update({"9": "caption"}),
                             r"caption '9': expected a caption record \(object\), got str"),
}


# ---------------------------------------------------------------------------------------------------------
# The human-annotated test file: real records, and the quirks hand-edited copies of it show

def real_record(caption: str, label: int, type_name: str) -> dict:
    return {"caption": caption, "label": label, "type": type_name, "replaced": None}


# Verbatim from the public copy of the test set (WenW186079/HNC_CLIP_masterthesis, dataset/filtered_test_data.json):
# trailing space, double spaces, ids 6/7 absent here, an identical pair.
REAL_TEST = {
    "n100552.jpg": {
        "0": real_record("The fence is behind either the elephant or the bush.", 1, "xor_logic_relation"),
        "1": real_record("The fence is behind either the elephant or the trunk.", 0, "xor_logic_relation"),
        "2": real_record("There are both an elephant on the ground and plants to the right of elephant.", 1,
                         "and_logic_relation"),
        "3": real_record("There are both an elephant on the ground and plants to the left of elephant. ", 0,
                         "and_logic_relation"),
        "4": real_record("There is at least one bush that is behind the elephant.", 1, "verify_object_relation"),
        "5": real_record("There is no bush that is behind the elephant.", 0, "verify_object_relation"),
        "8": real_record("The elephant is in front of the fence", 1, "relation"),
        "9": real_record("The giraffe is in  front of the fence", 0, "relation"),
    },
    "n65230.jpg": {
        "2": real_record("There is no dress that is to the left of the toilet.", 1, "verify_object_relation"),
        "3": real_record("There is no dress that is to the left of the toilet.", 0, "verify_object_relation"),
    },
}


def test_real_test_records_give_their_pairs_and_drop_the_identical_one(tmp_path):
    frame = read_pairs(write(tmp_path, REAL_TEST))
    summary = frame.attrs["stats"]
    assert list(zip(frame["positive_id"], frame["negative_id"], frame["type"])) == [
        ("0", "1", "xor_logic_relation"), ("2", "3", "and_logic_relation"), ("4", "5", "verify_object_relation"),
        ("8", "9", "relation")]
    assert frame["negative"].iloc[1].endswith("left of elephant.")  # trailing space gone
    assert frame["negative"].iloc[3] == "The giraffe is in front of the fence"  # double space collapsed
    assert summary["dropped"]["identical_pair"] == 1
    assert summary["test_captions_skipped"] == {r: 0 for r in TEST_SKIP_REASONS}


TEST_QUIRKS = {
    # name: (edit of REAL_TEST's first image, pairs of it read, skipped by reason, pairs stored reversed)
    "pair stored negative first": (lambda d: [d[c].update(label=1 - d[c]["label"]) for c in "23"],
                                   [("0", "1"), ("3", "2"), ("4", "5"), ("8", "9")], {}, 1),
    "labels as strings": (lambda d: [d[c].update(label=str(d[c]["label"])) for c in "01"],
                          [("0", "1"), ("2", "3"), ("4", "5"), ("8", "9")], {}, 0),
    "type in other spelling": (lambda d: [d[c].update(type=" Verify Object-Relation") for c in "45"],
                               [("0", "1"), ("2", "3"), ("4", "5"), ("8", "9")], {}, 0),
    "orphan caption": (lambda d: d.pop("3"), [("0", "1"), ("4", "5"), ("8", "9")], {"unpaired": 1}, 0),
    "pair types differ": (lambda d: d["1"].update(type="relation"), [("2", "3"), ("4", "5"), ("8", "9")],
                          {"unpaired": 2}, 0),
    "empty caption": (lambda d: d["5"].update(caption="  "), [("0", "1"), ("2", "3"), ("8", "9")],
                      {"empty_caption": 1, "unpaired": 1}, 0),
    "label 2": (lambda d: d["8"].update(label=2), [("0", "1"), ("2", "3"), ("4", "5")],
                {"bad_label": 1, "unpaired": 1}, 0),
    "unknown type": (lambda d: d["0"].update(type="colour"), [("2", "3"), ("4", "5"), ("8", "9")],
                     {"unknown_type": 1, "unpaired": 1}, 0),
}


@pytest.mark.parametrize("quirk", sorted(TEST_QUIRKS))
def test_test_file_quirks_are_read_or_counted_never_a_stop(tmp_path, quirk):
    edit, expected_pairs, skipped, reversed_pairs = TEST_QUIRKS[quirk]
    frame = read_pairs(write(tmp_path, mutated(REAL_TEST, lambda d: edit(d["n100552.jpg"]))))
    first_image = frame[frame["image_id"] == "n100552"]
    assert list(zip(first_image["positive_id"], first_image["negative_id"])) == expected_pairs
    summary = frame.attrs["stats"]
    assert summary["test_captions_skipped"] == {r: skipped.get(r, 0) for r in TEST_SKIP_REASONS}
    assert summary["test_pairs_reversed"] == reversed_pairs
    assert set(first_image["type"]) <= set(TEST_TYPE_EQUIVALENTS)


def test_a_respelled_type_is_reported_and_a_file_of_nothing_but_skips_stops(tmp_path):
    respelled = mutated(REAL_TEST, lambda d: d["n100552.jpg"]["4"].update(type="Verify_Object_Relation"))
    assert read_pairs(write(tmp_path, respelled)).attrs["stats"]["test_type_spellings"] == {"'Verify_Object_Relation' → verify_object_relation": 1}
    broken = {"n1.jpg": {"0": real_record("a", 7, "relation"), "1": real_record("b", 7, "relation")}}
    with pytest.raises(HNCFormatError, match=r"no test pair could be read \(captions skipped: \{'bad_label': 2\}\)"):
        read_pairs(write(tmp_path, broken))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_records_raise_hnc_format_error_naming_file_and_record(tmp_path, case):
    data, edit, message = BAD_INPUTS[case]
    path = write(tmp_path, mutated(data, edit))
    with pytest.raises(HNCFormatError, match=message) as caught:
        read_pairs(path)
    assert str(caught.value).startswith(str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps(TRAIN)[:-300].encode(), r"malformed JSON after image '2354786' .*premature EOF"),
        (b'{"2354786": {"captions": {"0": {"caption": "caf\xe9", "label": 1}}}}', r"not valid UTF-8"),
        (b"[1, 2]", r"expected a top-level object, but the file starts with b'\[1, 2\]'"),
        (b"  \n", r"expected a top-level object, but the file is empty"),
        (b'{"n1.jpg": {}, "n1.jpg": {}}', r"image 'n1' appears twice"),
        (b'{"2354786": {"captions": []}}', r"image '2354786': 'captions' must be an object"),
    ],
)
def test_malformed_files_raise_hnc_format_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(HNCFormatError, match=message) as caught:
        read_pairs(path)
    assert str(caught.value).startswith(str(path))


# ---------------------------------------------------------------------------------------------------------
# Atomicity


def test_failure_midway_leaves_no_part_files(tmp_path, monkeypatch):
    monkeypatch.setattr(hnc, "_MIN_ROWS_PER_GROUP", 1)
    monkeypatch.setattr(hnc, "_BUFFERED_ROWS_BUDGET", 1)  # rows reach the shard files before the failure
    data = many_images(10)
    data["9999"] = {"captions": {"0": {"caption": "broken", "label": 5, "type": "attribute"}}}
    path = write(tmp_path, data)
    out = tmp_path / "out" / "shards"
    with pytest.raises(HNCFormatError, match="image '9999', caption '0'"):
        write_pair_shards(path, out, n_shards=3, progress=False)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temp directory left behind either
    assert gc.isenabled()  # the collector, paused while streaming, is back on after the failure


def test_failed_rerun_keeps_the_previous_complete_output(tmp_path):
    out = tmp_path / "shards"
    write_pair_shards(write(tmp_path, TRAIN), out, n_shards=2, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write(tmp_path, mutated(TRAIN, lambda d: TRAIN_CAPTIONS(d)["1"].update(label=3)), "bad.json")
    with pytest.raises(HNCFormatError):
        write_pair_shards(bad, out, n_shards=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "hnc.json", "shards"]


def test_read_pair_shards_refuses_an_unfinished_directory(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no stats.json"):
        read_pair_shards(tmp_path / "shards")


# ---------------------------------------------------------------------------------------------------------
# The synthetic world's files go through the same readers


@pytest.fixture(scope="module")
def synthetic_world(tmp_path_factory):
    from hnclip import synth
    config = synth.WorldConfig(
        n_train=60, n_val=20, n_test=20, n_vqa_train=5, n_vqa_val=10, n_textvqa_train=5, n_textvqa_val=5,
        zeroshot_per_class=1, image_size=32, duplicate_pair_rate=0.2,
    )
    root = tmp_path_factory.mktemp("world")
    return root, synth.write_world(root, config)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_synthetic_world_hnc_files_convert(synthetic_world, tmp_path, split):
    root, counts = synthetic_world
    json_path, images = root / "hnc" / f"hnc_clean_strict_{split}.json", root / "gqa" / "images"
    stats = write_pair_shards(json_path, tmp_path / "shards", n_shards=4, images_dir=images, progress=False)
    frame = read_pair_shards(tmp_path / "shards")
    expected = counts["gqa_hnc"][split]
    assert stats["shape"] == ("test" if split == "test" else "train_val")
    assert stats["images"] == expected["images"]
    assert stats["dropped"]["duplicate_pair"] == expected["duplicate_pairs"]
    assert len(frame) == stats["pairs"] == expected["pairs"] - expected["duplicate_pairs"]
    assert set(stats["pairs_per_type"]) <= set(expected["by_type"])
    assert set(frame["type_group"]) <= set(hnc.GROUPS)
    assert all(Path(p).is_file() for p in frame["image_path"].unique())
    assert (frame["positive"].str.lower() != frame["negative"].str.lower()).all()


def test_the_one_shard_reader_selects_columns_and_names_a_shard_that_lacks_one(tmp_path):
    from hnclip.data.hnc import PairTableError, read_pair_tables

    frame = pd.DataFrame({"image_id": ["a", "b"], "positive": ["p1", "p2"], "negative": ["n1", "n2"]})
    good, bad = tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"
    frame.to_parquet(good)
    frame.drop(columns=["negative"]).to_parquet(bad)
    both = read_pair_tables([good, good], columns=["image_id", "negative"])
    assert both.columns.tolist() == ["image_id", "negative"] and both["negative"].tolist() == ["n1", "n2"] * 2
    assert read_pair_tables([good]).columns.tolist() == ["image_id", "positive", "negative"]
    with pytest.raises(PairTableError, match=r"part-00001.parquet lacks columns \['negative'\]"):
        read_pair_tables([good, bad], required=["negative"])
    with pytest.raises(PairTableError, match="no pair shards given"):
        read_pair_tables([])
