"""VQA scoring: per-question official scores, rows with CIs and paired differences on the same questions."""

import pandas as pd
import pytest

from hnclip.evaluate.stats import ReferenceAlignmentError
from hnclip.llava.score import score_items, vqa_report

ANSWERS = ["2"] * 10


def _questions(n=6):
    return pd.DataFrame({
        "question_id": range(n), "image_id": [str(i // 2) for i in range(n)], "answers": [ANSWERS] * n,
        "answer_type": ["number"] * n, "question_type": ["how many"] * n,
    })


def test_scores_and_paired_differences_against_a_reference():
    questions = _questions()
    model = score_items(pd.DataFrame({"question_id": range(6), "prediction": ["two"] * 3 + ["3"] * 3}),
                        questions, "vqav2")
    assert model["accuracy"].tolist() == [1.0] * 3 + [0.0] * 3  # "two" normalises to "2"
    reference = model.assign(accuracy=0.0).iloc[::-1]  # another order: aligned by question_id
    rows = vqa_report(model, model="m", benchmark="vqav2", references={"baseline": reference}, n_boot=200, seed=0)
    overall = rows[0]
    assert (overall["subset"], overall["value"], overall["n"]) == ("all", 0.5, 6)
    assert overall["delta_vs_baseline"] == pytest.approx(0.5)
    assert overall["test"] == "paired_bootstrap"


def test_a_reference_missing_questions_is_refused():
    model = score_items(pd.DataFrame({"question_id": range(6), "prediction": ["2"] * 6}), _questions(), "vqav2")
    with pytest.raises(ReferenceAlignmentError, match="reference 'control' lacks 1 of 6 evaluated items"):
        vqa_report(model, model="m", benchmark="vqav2", references={"control": model.iloc[1:]}, n_boot=50, seed=0)


def test_a_question_without_prediction_is_an_error():
    with pytest.raises(ValueError, match="1 vqav2 question\\(s\\) have no prediction, e.g. question_id 5"):
        score_items(pd.DataFrame({"question_id": range(5), "prediction": ["2"] * 5}), _questions(), "vqav2")


def test_vqav2_predictions_pass_the_evalai_processor_first_as_llava_uploads_them():
    """LLaVA-1.5's VQA v2 number scores EvalAIAnswerProcessor(prediction) on the server: a possessive is split off
    ("man's hat" → "man 's hat") and so no longer matches "man's hat"; "Yes." and "2," still match."""
    questions = pd.DataFrame({
        "question_id": range(3), "image_id": ["0", "1", "2"], "answer_type": ["other", "yes/no", "number"],
        "question_type": ["what is"] * 3, "answers": [["man's hat"] * 10, ["yes"] * 10, ["2"] * 10],
    })
    scored = score_items(pd.DataFrame({"question_id": range(3), "prediction": ["Man's hat", "Yes.", "2,"]}),
                         questions, "vqav2")
    assert scored["accuracy"].tolist() == [0.0, 1.0, 1.0]
