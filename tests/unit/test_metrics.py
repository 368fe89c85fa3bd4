"""VQA v2 / TextVQA per-item scoring: hand-derived values for the official normalisation and soft accuracy."""

from __future__ import annotations

import pytest

from hnclip.llava.metrics import (
    CONTRACTIONS,
    normalize_textvqa_answer,
    normalize_vqa_answer,
    textvqa_accuracy,
    textvqa_exact_match,
    vqa_accuracy,
)

SCORERS = [vqa_accuracy, textvqa_accuracy]


def answers_with(matching: str, count: int, filler: str = "blue") -> list[str]:
    """Ten answers, ``count`` of them equal to ``matching`` and the rest ``filler``."""
    return [matching] * count + [filler] * (10 - count)


def leave_one_out_by_hand(matches: int) -> float:
    """The official rule written out: drop each of the 10 answers, score min(1, hits among the 9 / 3)."""
    scores = []
    for dropped in range(10):
        hits = matches - (1 if dropped < matches else 0)
        scores.append(min(1.0, hits / 3))
    return sum(scores) / 10


# ---- soft accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_accuracy_steps(scorer, matches, expected):
    # 1 match: 9 subsets keep it (1/3 each), 1 drops it (0): (9/3)/10 = 0.3, exactly.
    assert scorer("red", answers_with("red", matches)) == expected
    assert expected == pytest.approx(leave_one_out_by_hand(matches), abs=1e-15)


@pytest.mark.parametrize("scorer", SCORERS)
def test_soft_accuracy_is_order_independent(scorer):
    answers = ["blue", "red", "blue", "green", "red", "blue", "blue", "red", "green", "blue"]
    assert scorer("red", answers) == 0.9
    assert scorer("red", list(reversed(answers))) == 0.9
    assert scorer("green", answers) == 0.6
    assert scorer("blue", answers) == 1.0
    assert scorer("purple", answers) == 0.0


# ---- VQA normalisation --------------------------------------------------------------------------


def test_vqa_number_words_become_digits():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("none") == "0"
    assert normalize_vqa_answer("ten") == "10"
    assert normalize_vqa_answer("eleven") == "eleven"  # the map stops at ten


def test_vqa_trailing_period_is_stripped():
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert normalize_vqa_answer("yes.") == "yes"


def test_vqa_period_rule_keeps_decimal_points_only():
    assert normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("5.") == "5"  # the official "after a digit" guard is a no-op
    assert normalize_vqa_answer("e.g.") == "eg"
    assert normalize_vqa_answer(".5") == ".5"


def test_vqa_period_rule_removes_at_most_32_periods():
    # The official call passes re.UNICODE (= 32) as sub()'s count.
    assert normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


def test_vqa_contraction_without_apostrophe_meets_spelled_form():
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("don't") == "don't"  # "'" is not a punctuation mark here
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0


def test_vqa_capitalised_contraction_keys_never_fire():
    # "Im" -> "I'm" is in the table but words are lower-cased first, so "im" stays.
    assert CONTRACTIONS["Im"] == "I'm"
    assert normalize_vqa_answer("Im") == "im"


def test_vqa_articles_are_dropped_as_words_only():
    assert normalize_vqa_answer("The red ball") == "red ball"
    assert normalize_vqa_answer("a an the") == ""
    assert normalize_vqa_answer("theater") == "theater"
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0


def test_vqa_punctuation_space_or_delete_rule():
    # A mark becomes a space unless it touches a space somewhere or a digit-comma-digit occurs.
    assert normalize_vqa_answer("red/blue") == "red blue"
    assert normalize_vqa_answer("red/blue /") == "redblue"
    assert normalize_vqa_answer("red,white") == "red white"
    assert normalize_vqa_answer("red, white") == "red white"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("1,000 (approx)") == "1000 approx"  # the digit-comma-digit deletes all
    assert normalize_vqa_answer("(approx)") == "approx"


def test_vqa_marks_outside_the_official_list_are_kept():
    assert normalize_vqa_answer("yes:") == "yes:"  # ":" is not in the list
    assert normalize_vqa_answer("100%") == "100%"
    assert normalize_vqa_answer("yes!") == "yes"  # "!" is
    assert normalize_vqa_answer("t-shirt") == "t shirt"  # so is "-"


def test_vqa_whitespace_and_case():
    assert normalize_vqa_answer("  Red\tBall\n") == "red ball"


def test_vqa_all_identical_answers_are_still_normalised():
    # The official script skips normalisation here and scores 0; we always normalise (docs/data.md).
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 1.0


# ---- TextVQA normalisation ----------------------------------------------------------------------


def test_textvqa_possessive_s_is_split_off():
    assert normalize_textvqa_answer("McDonald's") == "mcdonald 's"
    assert normalize_textvqa_answer("mcdonald 's") == "mcdonald 's"
    assert textvqa_accuracy("McDonald's", ["mcdonald 's"] * 3 + ["burger king"] * 7) == 0.9
    # The VQA normaliser keeps the word whole, so the same pair does not meet there.
    assert normalize_vqa_answer("McDonald's") == "mcdonald's"


def test_textvqa_commas_and_question_marks_are_deleted_not_spaced():
    assert normalize_textvqa_answer("red,white") == "redwhite"
    assert normalize_textvqa_answer("what?") == "what"
    assert normalize_textvqa_answer("1,000") == "1000"
    assert textvqa_accuracy("1,000", ["1000"] * 10) == 1.0


def test_textvqa_shares_the_vqa_steps():
    assert normalize_textvqa_answer("The Two.") == "2"
    assert normalize_textvqa_answer("dont") == "don't"
    assert normalize_textvqa_answer("coca-cola") == "coca cola"
    assert normalize_textvqa_answer("3.5") == "3.5"


# ---- exact match --------------------------------------------------------------------------------


def test_exact_match_uses_the_normalised_majority():
    answers = ["Stop"] * 4 + ["stop sign"] * 3 + ["go"] * 3
    assert textvqa_exact_match("STOP.", answers) == 1.0
    assert textvqa_exact_match("stop sign", answers) == 0.0
    # Normalisation merges spellings before counting: 3 "coke" + 3 "Coke." beat 4 "pepsi".
    assert textvqa_exact_match("coke", ["coke"] * 3 + ["Coke."] * 3 + ["pepsi"] * 4) == 1.0


def test_exact_match_tie_accepts_any_tied_answer_regardless_of_order():
    answers = ["pepsi"] * 4 + ["coke"] * 4 + ["sprite"] * 2
    assert textvqa_exact_match("pepsi", answers) == 1.0
    assert textvqa_exact_match("coke", answers) == 1.0
    assert textvqa_exact_match("coke", list(reversed(answers))) == 1.0
    assert textvqa_exact_match("sprite", answers) == 0.0


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", [vqa_accuracy, textvqa_accuracy, textvqa_exact_match])
@pytest.mark.parametrize("count", [0, 9, 11])
def test_wrong_number_of_answers_is_rejected(scorer, count):
    with pytest.raises(ValueError, match=rf"{scorer.__name__}: expected exactly 10 answers, got {count}"):
        scorer("yes", ["yes"] * count)


@pytest.mark.parametrize("scorer", [vqa_accuracy, textvqa_accuracy, textvqa_exact_match])
def test_non_string_inputs_are_rejected(scorer):
    with pytest.raises(TypeError, match="prediction must be a str"):
        scorer(None, ["yes"] * 10)
    with pytest.raises(TypeError, match=r"answers\[3\] must be a str, got int"):
        scorer("yes", ["yes"] * 3 + [2] + ["yes"] * 6)
    with pytest.raises(TypeError, match="answers must be a list"):
        scorer("yes", "yesyesyesy")
