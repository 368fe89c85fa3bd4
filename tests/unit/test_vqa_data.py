"""VQA v2 / TextVQA readers, stratified subsampling and the question Parquet, on hand-written records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hnclip.data import MissingImageError
from hnclip.data.vqa import (
    QUESTION_COLUMNS,
    VQAFormatError,
    leading_words_question_type,
    majority_answer,
    read_questions,
    read_textvqa,
    read_vqav2,
    stratified_subsample,
    write_questions,
)


def vqa_answers(*answers: str) -> list[dict]:
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


VQA_QUESTIONS = {
    "info": {"description": "VQA v2"},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "data_subtype": "val2014",
    "questions": [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
        {"image_id": 42, "question": "How many people are there?", "question_id": 42001},
        {"image_id": 393225, "question": "Is it raining?", "question_id": 393225000},
    ],
}
VQA_ANNOTATIONS = {  # deliberately in another order than the questions
    "annotations": [
        {"image_id": 393225, "question_id": 393225000, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": vqa_answers(*["no"] * 9, "yes")},
        {"image_id": 42, "question_id": 42001, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": vqa_answers(*["2"] * 6, "two", "3", "3", "2")},
        {"image_id": 42, "question_id": 42000, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": vqa_answers(*["red"] * 7, "Red", "orange", "red and white")},
    ]
}

TEXTVQA = {
    "dataset_type": "val",
    "dataset_name": "textvqa",
    "dataset_version": "0.5.1",
    "data": [
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "image_classes": ["Camera"],
         "image_width": 1024, "image_height": 664, "question_id": 34602, "set_name": "val",
         "answers": ["nikon", "Nikon", "nikon", "nikon d90", "canon", "Canon", "canon", "nikon ", "canon", "eos"]},
        {"question": "What's the number on the bus?", "image_id": "00685bc495504d61", "image_classes": ["Bus"],
         "image_width": 800, "image_height": 600, "question_id": 34603, "set_name": "val",
         "answers": ["23", "23", "23", "23", "28", "23", "23", "23", "23", "23"]},
    ],
}
ROSETTA_OCR = {"data": [
    {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["nikon", "d90"], "ocr_info": []},
    {"image_id": "00685bc495504d61", "ocr_tokens": [], "ocr_info": []},
]}
# The shape of LLaVA's llava_textvqa_val_v051_ocr.jsonl: the id is the image's, the question capitalised, the
# OCR line present even when empty (docs/data.md).
LLAVA_OCR_LINES = [
    {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
     "text": "What is the brand of this camera?\nReference OCR token: nikon, d90\n"
             "Answer the question using a single word or phrase."},
    {"question_id": "00685bc495504d61", "image": "00685bc495504d61.jpg", "category": "default",
     "text": "What's the number on the bus?\nReference OCR token: \nAnswer the question using a single word or phrase."},
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def vqa_files(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 393225):
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(b"jpeg")
    return write_json(tmp_path / "q.json", VQA_QUESTIONS), write_json(tmp_path / "a.json", VQA_ANNOTATIONS), images


@pytest.fixture
def textvqa_files(tmp_path):
    images = tmp_path / "train_images"
    images.mkdir()
    for record in TEXTVQA["data"]:
        (images / f"{record['image_id']}.jpg").write_bytes(b"jpeg")
    return write_json(tmp_path / "TextVQA_0.5.1_val.json", TEXTVQA), images


# ---------------------------------------------------------------------------------------------------------
# VQA v2


def test_read_vqav2_one_row_per_question_with_every_column(vqa_files):
    questions, annotations, images = vqa_files
    frame = read_vqav2(questions, annotations, images)
    assert tuple(frame.columns) == QUESTION_COLUMNS
    assert frame["question_id"].dtype == np.int64
    rows = frame.to_dict("records")
    assert [r["question_id"] for r in rows] == [42000, 42001, 393225000]  # questions-file order
    first = rows[0]
    assert first["dataset"] == "vqav2"
    assert first["image_id"] == "42"
    assert first["image_path"] == str(images / "COCO_val2014_000000000042.jpg")
    assert first["question"] == "What color is the bus?"
    assert list(first["answers"]) == ["red"] * 7 + ["Red", "orange", "red and white"]
    assert (first["answer_type"], first["question_type"]) == ("other", "what color is the")
    assert first["majority_answer"] == "red"
    assert list(first["ocr_tokens"]) == [] and first["ocr_source"] == "none"
    assert rows[2]["image_path"] == str(images / "COCO_val2014_000000393225.jpg")
    assert [r["majority_answer"] for r in rows] == ["red", "2", "no"]
    assert [r["answer_type"] for r in rows] == ["other", "number", "yes/no"]
    assert all(len(r["answers"]) == 10 for r in rows)


def test_vqav2_missing_image_error_and_skip(vqa_files):
    questions, annotations, images = vqa_files
    (images / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"image COCO_val2014_000000000042\.jpg referenced by .*q\.json"):
        read_vqav2(questions, annotations, images)
    frame = read_vqav2(questions, annotations, images, on_missing_image="skip")
    assert list(frame["question_id"]) == [393225000]
    assert frame.attrs["dropped"] == {"missing_image": 2}
    assert frame.attrs["missing_images"] == ["COCO_val2014_000000000042.jpg"]


def edited(data: dict, edit) -> dict:
    data = copy.deepcopy(data)
    edit(data)
    return data


@pytest.mark.parametrize(
    "which, edit, message",
    [
        ("a", lambda d: d["annotations"][1]["answers"].pop(), r"a\.json: question 42001: expected 10 answers, got 9"),
        ("a", lambda d: d["annotations"].pop(0), r"a\.json: no annotation for question 393225000"),
        ("a", lambda d: d["annotations"][2].update(image_id=43),
         r"question 42000: annotation image 43 != question image 42"),
        ("a", lambda d: d["annotations"][0].pop("multiple_choice_answer"),
         r"annotation of question 393225000 has no 'multiple_choice_answer' field"),
        ("a", lambda d: d["annotations"].append(dict(d["annotations"][0])),
         r"a\.json: question 393225000 has more than one annotation"),
        ("q", lambda d: d["questions"].pop(), r"1 annotations have no question .* \(e\.g\. question 393225000\)"),
        ("q", lambda d: d.pop("data_subtype"), r"q\.json: the questions file has no 'data_subtype' field"),
        ("q", lambda d: d["questions"][1].update(question=None), r"question 42001: 'question' must be a string"),
        ("q", lambda d: d["questions"][0].update(image_id="42"), r"question 42000: image_id must be an integer"),
    ],
)
def test_vqav2_bad_records_are_named(vqa_files, which, edit, message):
    questions, annotations, images = vqa_files
    target, original = (questions, VQA_QUESTIONS) if which == "q" else (annotations, VQA_ANNOTATIONS)
    write_json(target, edited(original, edit))
    with pytest.raises(VQAFormatError, match=message):
        read_vqav2(questions, annotations, images)


def test_malformed_and_non_utf8_json_are_named(vqa_files):
    questions, annotations, images = vqa_files
    annotations.write_text(json.dumps(VQA_ANNOTATIONS)[:-20])
    with pytest.raises(VQAFormatError, match=r"a\.json: malformed JSON at line 1 column"):
        read_vqav2(questions, annotations, images)
    questions.write_bytes(b'{"questions": [], "data_subtype": "val\xff2014"}')
    with pytest.raises(VQAFormatError, match=r"q\.json: not valid UTF-8 \(byte 38"):
        read_vqav2(questions, annotations, images)


# ---------------------------------------------------------------------------------------------------------
# TextVQA


def test_read_textvqa_columns_and_derived_fields(textvqa_files):
    path, images = textvqa_files
    frame = read_textvqa(path, images)
    assert tuple(frame.columns) == QUESTION_COLUMNS
    rows = frame.to_dict("records")
    assert [r["question_id"] for r in rows] == [34602, 34603]
    assert rows[0]["dataset"] == "textvqa"
    assert rows[0]["image_id"] == "003a8ae2ef43b901"
    assert rows[0]["image_path"] == str(images / "003a8ae2ef43b901.jpg")
    assert list(rows[0]["answers"]) == TEXTVQA["data"][0]["answers"]
    # nikon/Nikon/"nikon " ×4 vs canon/Canon ×4: a tie after strip + lower, the first-given wins
    assert rows[0]["majority_answer"] == "nikon"
    assert rows[1]["majority_answer"] == "23"
    assert [r["answer_type"] for r in rows] == ["other", "other"]
    assert [r["question_type"] for r in rows] == ["what is", "what's the"]
    assert [(list(r["ocr_tokens"]), r["ocr_source"]) for r in rows] == [([], "none"), ([], "none")]


def test_textvqa_ocr_from_rosetta_llava_or_inline(textvqa_files, tmp_path):
    path, images = textvqa_files
    rosetta = write_json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", ROSETTA_OCR)
    frame = read_textvqa(path, images, ocr_json=rosetta)
    assert [list(t) for t in frame["ocr_tokens"]] == [["nikon", "d90"], []]
    assert set(frame["ocr_source"]) == {"rosetta:TextVQA_Rosetta_OCR_v0.2_val.json"}

    llava = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    llava.write_text("\n".join(json.dumps(line) for line in LLAVA_OCR_LINES) + "\n")
    frame = read_textvqa(path, images, ocr_json=llava)
    assert [list(t) for t in frame["ocr_tokens"]] == [["nikon", "d90"], []]
    assert set(frame["ocr_source"]) == {"llava:llava_textvqa_val_v051_ocr.jsonl"}

    inline = edited(TEXTVQA, lambda d: [r.update(ocr_tokens=["a", "b"]) for r in d["data"]])
    frame = read_textvqa(write_json(tmp_path / "inline.json", inline), images)
    assert [list(t) for t in frame["ocr_tokens"]] == [["a", "b"], ["a", "b"]]
    assert set(frame["ocr_source"]) == {"inline"}


def test_textvqa_bad_input(textvqa_files, tmp_path):
    path, images = textvqa_files
    write_json(path, edited(TEXTVQA, lambda d: d["data"][1]["answers"].append("24")))
    with pytest.raises(VQAFormatError, match=r"TextVQA_0\.5\.1_val\.json: question 34603: expected 10 answers, got 11"):
        read_textvqa(path, images)
    write_json(path, TEXTVQA)
    partial_ocr = write_json(tmp_path / "ocr.json", {"data": ROSETTA_OCR["data"][:1]})
    with pytest.raises(VQAFormatError, match=r"ocr\.json: no OCR entry for image '00685bc495504d61' \(question 3460"):
        read_textvqa(path, images, ocr_json=partial_ocr)
    (images / "00685bc495504d61.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"image 00685bc495504d61\.jpg referenced by"):
        read_textvqa(path, images)
    write_json(path, edited(TEXTVQA, lambda d: d["data"][1].update(question_id=34602)))
    with pytest.raises(VQAFormatError, match=r"question ids appear more than once: \[34602\]"):
        read_textvqa(path, images, on_missing_image="skip")


def test_question_type_and_majority_helpers():
    assert leading_words_question_type("What brand is the watch?") == "what brand"
    assert leading_words_question_type("  Who's   playing?!") == "who's playing"
    assert leading_words_question_type("Why?") == "why"
    assert leading_words_question_type("??") == "none"
    assert majority_answer(["b", "a", "A", "b ", "c"] + ["d"] * 5) == "d"
    assert majority_answer(["b", "a", "A", "b "] + [f"x{i}" for i in range(6)]) == "b"  # tie: b first
    assert majority_answer([" Coca Cola", "a", "coca cola", "A", "a"] + [f"x{i}" for i in range(5)]) == "a"
    assert majority_answer([" Coca Cola ", "coca cola", "A", "a"] + [f"x{i}" for i in range(6)]) == "Coca Cola"


# ---------------------------------------------------------------------------------------------------------
# Subsampling and writing


def question_frame(sizes: dict[str, int], shuffle_seed: int | None = None) -> pd.DataFrame:
    rows, qid = [], 0
    for question_type, size in sizes.items():
        for _ in range(size):
            rows.append({"question_id": qid, "question_type": question_type, "answer_type": "other"})
            qid += 1
    frame = pd.DataFrame(rows)
    if shuffle_seed is not None:
        frame = frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    return frame


@pytest.mark.parametrize(
    "sizes, n, quotas",
    [
        ({"what is": 50, "how many": 30, "is the": 20}, 10, {"what is": 5, "how many": 3, "is the": 2}),
        # exact shares 2.0 / 1.2 / 0.8: floors 2 / 1 / 0, the spare row goes to the largest remainder (0.8)
        ({"a": 5, "b": 3, "c": 2}, 4, {"a": 2, "b": 1, "c": 1}),
        # shares 1.5 / 1.5 / 1.0 → floors 1 / 1 / 1, remainder tie broken by stratum name
        ({"x": 3, "y": 3, "z": 2}, 4, {"x": 2, "y": 1, "z": 1}),
    ],
)
def test_stratified_subsample_quotas(sizes, n, quotas):
    sample = stratified_subsample(question_frame(sizes), n, seed=0)
    assert len(sample) == n
    assert sample["question_type"].value_counts().to_dict() == quotas
    assert sample["question_id"].is_unique and sample["question_id"].is_monotonic_increasing


def test_stratified_subsample_is_deterministic_and_order_free():
    sizes = {"what is": 40, "how many": 25, "is the": 35}
    first = stratified_subsample(question_frame(sizes), 20, seed=7)
    again = stratified_subsample(question_frame(sizes, shuffle_seed=3), 20, seed=7)
    pd.testing.assert_frame_equal(first, again)
    other = stratified_subsample(question_frame(sizes), 20, seed=8)
    assert list(other["question_id"]) != list(first["question_id"])
    everything = stratified_subsample(question_frame(sizes, shuffle_seed=1), 500, seed=7)
    assert list(everything["question_id"]) == list(range(100))
    assert len(stratified_subsample(question_frame(sizes), 0, seed=7)) == 0


def test_write_and_read_questions_round_trip(vqa_files, textvqa_files, tmp_path):
    frame = pd.concat([read_vqav2(*vqa_files), read_textvqa(*textvqa_files)], ignore_index=True)
    out = tmp_path / "out" / "questions.parquet"
    write_questions(frame, out, metadata={"seed": 3, "source": "unit test"})
    schema = pq.read_schema(out)
    assert schema.field("question_id").type == pa.int64()
    assert schema.field("answers").type == pa.list_(pa.string())
    assert schema.field("ocr_tokens").type == pa.list_(pa.string())
    back = read_questions(out)
    assert {k: v for k, v in back.attrs["hnclip"].items() if k != "provenance"} == {"seed": 3, "source": "unit test"}
    assert {"git_commit", "versions"} <= set(back.attrs["hnclip"]["provenance"])
    assert back.drop(columns=["answers", "ocr_tokens"]).equals(frame.drop(columns=["answers", "ocr_tokens"]))
    assert [list(a) for a in back["answers"]] == [list(a) for a in frame["answers"]]
    assert [list(t) for t in back["ocr_tokens"]] == [list(t) for t in frame["ocr_tokens"]]
    assert [p.name for p in out.parent.iterdir()] == ["questions.parquet"]  # no temp file left


def test_write_questions_refuses_wrong_columns(vqa_files, tmp_path):
    frame = read_vqav2(*vqa_files)
    with pytest.raises(ValueError, match="differ from"):
        write_questions(frame.drop(columns=["ocr_source"]), tmp_path / "q.parquet")
    assert not (tmp_path / "q.parquet").exists()


# ---------------------------------------------------------------------------------------------------------
# The synthetic world's files go through the same readers


@pytest.fixture(scope="module")
def synthetic_world(tmp_path_factory):
    from hnclip import synth
    config = synth.WorldConfig(
        n_train=60, n_val=20, n_test=20, n_vqa_train=5, n_vqa_val=24, n_textvqa_train=5, n_textvqa_val=12,
        zeroshot_per_class=1, image_size=32,
    )
    root = tmp_path_factory.mktemp("world")
    return root, synth.write_world(root, config)


def test_synthetic_world_vqa_and_textvqa_files_read(synthetic_world, tmp_path):
    root, counts = synthetic_world
    vqa = read_vqav2(
        root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
        root / "vqav2" / "v2_mscoco_val2014_annotations.json",
        root / "vqav2" / "val2014",
    )
    assert len(vqa) == counts["vqav2"]["val2014"]["questions"]
    assert vqa["question_type"].value_counts().to_dict() == counts["vqav2"]["val2014"]["by_question_type"]
    assert vqa["answers"].map(len).eq(10).all()

    text_dir = root / "textvqa"
    text = read_textvqa(text_dir / "TextVQA_0.5.1_val.json", text_dir / "train_images",
                        ocr_json=text_dir / "TextVQA_Rosetta_OCR_v0.2_val.json")
    assert len(text) == counts["textvqa"]["val"]["questions"]
    ocr = json.loads((text_dir / "TextVQA_Rosetta_OCR_v0.2_val.json").read_text())["data"]
    tokens_of_image = {entry["image_id"]: entry["ocr_tokens"] for entry in ocr}
    assert {i: list(t) for i, t in zip(text["image_id"], text["ocr_tokens"])} == {
        i: tokens_of_image[i] for i in text["image_id"]
    }
    assert text["answers"].map(len).eq(10).all()

    both = pd.concat([vqa, text], ignore_index=True)
    write_questions(both, tmp_path / "q.parquet")
    assert len(read_questions(tmp_path / "q.parquet")) == len(both)
