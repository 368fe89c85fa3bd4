"""TextVQA asked exactly as LLaVA-1.5 asks it, pinned on real records.

``records/llava_textvqa_val_v051_ocr.sample.jsonl`` holds six lines, verbatim, of LLaVA's question file (lines 1, 6,
15, 37, 1437 and 1438 of the 5,000: one without OCR tokens, one starting with punctuation, two questions of one
image). The TextVQA side is the raw question: for question 34602 the published record ("what is the brand of this
camera?"); for the others the question as the dataset writes it, in lower case.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hnclip.data.vqa import read_textvqa
from hnclip.llava.infer import question_prompt
from hnclip.llava.prompt import SYSTEM_PROMPT, asked_question, llava15_user_message, prompt_variant

LLAVA_LINES = Path(__file__).parent / "records" / "llava_textvqa_val_v051_ocr.sample.jsonl"
RECORDS = [json.loads(line) for line in LLAVA_LINES.read_text().splitlines()]
RAW_QUESTIONS = [
    (34602, "what is the brand of this camera?"),
    (34607, "what number is on the player's jersey?"),
    (34616, "is this denny's?"),
    (34638, "whats the lowest number yard line that you can see?"),
    (36038, "/?what needs to be taken away?"),
    (36039, "what does the text on the right panel say?"),
]


def ocr_tokens_of(llava_text: str) -> list[str]:
    line = llava_text.split("\n")[1].removeprefix("Reference OCR token: ")
    return line.split(", ") if line else []


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_the_user_turn_is_llavas_question_file_text(index):
    record, (_, raw) = RECORDS[index], RAW_QUESTIONS[index]
    asked = asked_question(raw, "textvqa")
    assert llava15_user_message(asked, ocr_tokens=ocr_tokens_of(record["text"]), with_image=False) == record["text"]


def test_capitalisation_is_str_capitalize_and_only_for_textvqa():
    assert asked_question("what is the brand of this camera?", "textvqa") == "What is the brand of this camera?"
    assert asked_question("/?what needs to be taken away?", "textvqa") == "/?what needs to be taken away?"
    assert asked_question("where will I be?", "textvqa") == "Where will i be?"  # as lmms-eval and LLaVA's file
    assert asked_question("what sport is this?", "vqav2") == "what sport is this?"


def test_an_image_without_ocr_tokens_keeps_the_line_empty():
    assert llava15_user_message("Q?", ocr_tokens=[], with_image=False) == (
        "Q?\nReference OCR token: \nAnswer the question using a single word or phrase.")
    assert "Reference OCR token" not in llava15_user_message("Q?", ocr_tokens=None, with_image=False)


def test_from_the_raw_files_to_the_prompt_the_model_receives(tmp_path):
    """TextVQA's JSON and LLaVA's OCR file, read by the pipeline's reader, give every question LLaVA's text."""
    images = tmp_path / "train_images"
    images.mkdir()
    data = []
    for record, (question_id, raw) in zip(RECORDS, RAW_QUESTIONS):
        (images / record["image"]).write_bytes(b"jpeg")
        data.append({"question_id": question_id, "question": raw, "image_id": record["question_id"],
                     "answers": ["a"] * 10})
    questions = tmp_path / "TextVQA_0.5.1_val.json"
    questions.write_text(json.dumps({"data": data}))

    frame = read_textvqa(questions, images, ocr_json=LLAVA_LINES)

    for row, record in zip(frame.itertuples(index=False), RECORDS):
        prompt = question_prompt(row, use_ocr=True)
        assert prompt == f"{SYSTEM_PROMPT} USER: <image>\n{record['text']} ASSISTANT:"
    assert prompt_variant(True, "textvqa") == "llava15_vicuna_v1_short_answer_capitalised_ocr"


def test_a_question_the_llava_file_lacks_is_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "003a8ae2ef43b901.jpg").write_bytes(b"jpeg")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"data": [{"question_id": 1, "question": "who made it?",
                                               "image_id": "003a8ae2ef43b901", "answers": ["a"] * 10}]}))
    with pytest.raises(ValueError, match=r"no OCR entry for question 1 \(image '003a8ae2ef43b901', "
                                         r"question 'who made it\?'\)"):
        read_textvqa(questions, images, ocr_json=LLAVA_LINES)


def test_every_prediction_carries_the_prompt_it_was_asked_with():
    from hnclip.llava.infer import _prediction_record

    row = SimpleNamespace(question_id=34602, dataset="textvqa", image_id="003a8ae2ef43b901",
                          question=RAW_QUESTIONS[0][1], ocr_tokens=ocr_tokens_of(RECORDS[0]["text"]))
    settings = {"use_ocr": True, "prompt_variant": prompt_variant(True, "textvqa"), "max_new_tokens": 8}
    record = _prediction_record(row, "dakota", 2, settings)
    assert record["prompt"] == f"{SYSTEM_PROMPT} USER: <image>\n{RECORDS[0]['text']} ASSISTANT:"
