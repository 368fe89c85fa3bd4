"""VQA v2 test-dev: the EvalAI submission file from constructed predictions, and the returned score's import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hnclip.data.vqa import VQAV2_TESTDEV, read_question_ids, read_vqav2_testdev
from hnclip.llava.submission import (
    IMPORTED_SCORES_FILE,
    SubmissionError,
    import_evalai_result,
    main,
    submission_records,
    write_submission,
)
from hnclip.report.summary import read_result_file

# test2015 in its file's order; the first three are test-dev too.
TEST2015_IDS = [262144005, 262144003, 262144000, 262144001, 262145000]
TESTDEV = [
    {"image_id": 262144, "question": "What credit card company is on the banner in the background?",
     "question_id": 262144005},
    {"image_id": 262144, "question": "Is the ball flying towards the batter?", "question_id": 262144003},
    {"image_id": 262144, "question": "What sport is this?", "question_id": 262144000},
]


def test_every_test2015_id_in_order_answers_processed_and_missing_ones_empty():
    predictions = {262144005: "Mastercard", 262144003: "Yes.", 262144000: "The man's bat, 2 balls"}

    records, n_empty = submission_records(predictions, TEST2015_IDS)

    assert [r["question_id"] for r in records] == TEST2015_IDS
    # the EvalAI answer processor: lower-cased, commas and "?" gone, "'s" split off, period and article dropped
    assert [r["answer"] for r in records] == ["mastercard", "yes", "man 's bat 2 balls", "", ""]
    assert n_empty == 2


def test_a_prediction_outside_test2015_is_an_error_not_a_silent_drop():
    with pytest.raises(SubmissionError, match=r"1 predicted question ids are not test2015 questions \(e.g. \[7\]\)"):
        submission_records({7: "yes"}, TEST2015_IDS)


def write_test_files(root: Path) -> tuple[Path, Path, Path]:
    images = root / "test2015"
    images.mkdir(parents=True)
    (images / "COCO_test2015_000000262144.jpg").write_bytes(b"jpeg")
    testdev = root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    testdev.write_text(json.dumps({"data_subtype": "test-dev2015", "questions": TESTDEV}))
    test2015 = root / "v2_OpenEnded_mscoco_test2015_questions.json"
    test2015.write_text(json.dumps({"data_subtype": "test2015", "questions": [
        {"image_id": q // 1000, "question": "?", "question_id": q} for q in TEST2015_IDS]}))
    return testdev, test2015, images


def test_testdev_reader_has_no_answers_and_test2015_images(tmp_path):
    testdev, test2015, images = write_test_files(tmp_path)
    frame = read_vqav2_testdev(testdev, images)
    assert list(frame["question_id"]) == [262144005, 262144003, 262144000]
    assert set(frame["dataset"]) == {VQAV2_TESTDEV}
    assert set(frame["image_path"]) == {str(images / "COCO_test2015_000000262144.jpg")}
    assert all(len(answers) == 0 for answers in frame["answers"])
    assert read_question_ids(test2015) == TEST2015_IDS


@pytest.fixture
def written_submission(tmp_path):
    testdev, test2015, images = write_test_files(tmp_path / "raw")
    questions = tmp_path / "questions.parquet"
    read_vqav2_testdev(testdev, images).to_parquet(questions)
    chunk = tmp_path / "chunk-0.jsonl"
    chunk.write_text("".join(json.dumps({"question_id": q, "prediction": p}) + "\n" for q, p in
                             [(262144000, "Baseball"), (262144003, "No"), (262144005, "Visa.")]))
    out = tmp_path / "baseline" / VQAV2_TESTDEV
    out.mkdir(parents=True)
    info = write_submission(model="baseline", chunk_paths=[chunk], questions_parquet=questions,
                            test_questions_json=test2015, out_predictions=out / "predictions.jsonl",
                            out_submission=out / "submission.json", out_info=out / "submission_info.json")
    return out, info


def test_written_submission_is_one_json_array_over_all_test2015_ids(written_submission):
    out, info = written_submission
    submission = json.loads((out / "submission.json").read_text())
    assert submission == [
        {"question_id": 262144005, "answer": "visa"}, {"question_id": 262144003, "answer": "no"},
        {"question_id": 262144000, "answer": "baseball"}, {"question_id": 262144001, "answer": ""},
        {"question_id": 262145000, "answer": ""},
    ]
    assert (info["answered"], info["test2015_questions"], info["empty_answers"]) == (3, 5, 2)
    assert "eval.ai" in info["upload_to"] and info["phase"] == "test-dev"


def test_returned_score_becomes_a_result_file_the_summary_reads(written_submission, tmp_path, capsys):
    out, _ = written_submission
    result = tmp_path / "evalai_result.json"
    result.write_text(json.dumps([{"test-dev": {"yes/no": 93.33, "number": 62.22, "other": 72.62, "overall": 79.97}},
                                  {"test-standard": {"yes/no": 0, "number": 0.02, "other": 0.04, "overall": 0.02}}]))

    main(["import-score", str(out / "submission.json"), str(result)])

    assert "rerun snakemake" in capsys.readouterr().out
    model, rows, provenance = read_result_file(out / IMPORTED_SCORES_FILE)
    assert model == "baseline"
    assert {r["subset"]: (r["value"], r["n"]) for r in rows} == {
        "all": (pytest.approx(0.7997), 3), "yes/no": (pytest.approx(0.9333), 3),
        "number": (pytest.approx(0.6222), 3), "other": (pytest.approx(0.7262), 3)}
    assert all(r["benchmark"] == VQAV2_TESTDEV and r["ci_low"] is None for r in rows)
    assert provenance["phase"] == "test-dev" and len(provenance["submission_sha256"]) == 64


def test_import_refuses_a_result_without_the_phase_or_an_edited_submission(written_submission, tmp_path):
    out, _ = written_submission
    result = tmp_path / "evalai_result.json"
    result.write_text(json.dumps({"test-standard": {"yes/no": 1, "number": 1, "other": 1, "overall": 1}}))
    with pytest.raises(SubmissionError, match=r"evalai_result\.json: no 'test-dev' scores"):
        import_evalai_result(out / "submission.json", result)
    result.write_text(json.dumps({"test-dev": {"overall": 80.0}}))
    with pytest.raises(SubmissionError, match="lacks yes/no, number, other"):
        import_evalai_result(out / "submission.json", result)
    (out / "submission.json").write_text("[]")
    with pytest.raises(SubmissionError, match="submission.json changed since the workflow wrote it"):
        import_evalai_result(out / "submission.json", result)
    assert not (out / IMPORTED_SCORES_FILE).exists()
