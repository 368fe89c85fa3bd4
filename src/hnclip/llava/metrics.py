r"""Per-item answer scoring for VQA v2 and TextVQA, reproducing the official evaluators' normalisation.

Sources (read, re-implemented here):

* VQA v2: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA at a013f00
  ("Fixed processing answers bug"). Its tables (contractions, number words, articles, punctuation)
  are identical to those of the EvalAI processor below.
* TextVQA: ``EvalAIAnswerProcessor`` and ``TextVQAAccuracyEvaluator`` in LLaVA's
  ``llava/eval/m4c_evaluator.py`` (haotian-liu/LLaVA at c121f04), copied there from mmf.

Both score a prediction against 10 human answers with the same soft accuracy: for each answer, drop
it, count how many of the other 9 equal the prediction, score min(1, matches / 3); average the 10
scores. So 0, 1, 2, 3, >= 4 matches give 0, 0.3, 0.6, 0.9, 1.

Quirks of the official code that are kept on purpose, because published numbers depend on them:

* The period rule ``(?!<=\d)(\.)(?!\d)`` was meant to keep periods after a digit, but ``(?!<=`` is a
  lookahead for the literal ``<=``, so it deletes every period not followed by a digit ("5." -> "5",
  "3.5" kept, "e.g." -> "eg"). The call passes ``re.UNICODE`` (= 32) as ``sub``'s ``count``, so at
  most 32 periods are removed.
* Whether a punctuation mark is deleted or replaced by a space is decided on the whole input: it is
  deleted if that mark touches a space somewhere, or if the text contains a digit-comma-digit anywhere
  (then every mark is deleted); otherwise it becomes a space: "red/blue" -> "red blue" but
  "red/blue /" -> "redblue", "1,000" -> "1000" but "red,white" -> "red white".
* The apostrophe and the colon are not in ``PUNCTUATION``, so "don't" stays "don't"; the contraction
  table maps "dont" -> "don't", so both spellings meet. "!" and "-" are in it.
* Contraction keys with capitals ("Im", "Ive", ...) can never match (words are lower-cased first), and
  "somebody'd" maps to "somebodyd" (reversed); both kept as in the source.

One deliberate deviation: the official VQA script skips all normalisation, of the
prediction too, when the 10 answers are identical strings; we always normalise, as lmms-eval's
``vqav2`` task does, so "Yes" against ten "yes" scores 1 here (0 there).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from types import MappingProxyType

__all__ = [
    "normalize_vqa_answer",
    "normalize_textvqa_answer",
    "vqa_accuracy",
    "textvqa_accuracy",
    "textvqa_exact_match",
]

ANSWERS_PER_QUESTION = 10

# Number words become digits ("none" counts as zero, as in the official map).
NUMBER_WORDS = MappingProxyType(
    {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
        "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
)
ARTICLES = frozenset({"a", "an", "the"})
# Marks handled by the punctuation rule; the period has its own rule. The order does not matter:
# each mark's fate is decided on the original text.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# Applied word by word after lower-casing, number mapping and article removal (official order).
CONTRACTIONS = MappingProxyType(
    {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
        "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
        "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
        "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
        "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
        "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
        "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
        "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
        "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
        "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
        "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
        "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
        "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
        "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
        "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
        "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
        "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
        "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
        "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
        "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
        "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
        "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
        "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
        "youll": "you'll", "youre": "you're", "youve": "you've",
    }
)

# VQA's test for "a number with a thousands comma somewhere": then every mark is deleted, not spaced.
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The EvalAI processor's version of the same test (one or more commas between digits).
_EVALAI_DIGIT_COMMAS_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# What the official "(?!<=\d)(\.)(?!\d)" actually matches: a period not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_REMOVAL_LIMIT = int(re.UNICODE)  # the official call passes re.UNICODE as count


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as VQA v2's ``vqaEval.py`` does (prediction and human answers alike).

    Newlines/tabs -> spaces, strip, punctuation rule, period rule, lower-case, number words -> digits,
    drop articles, expand contractions.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _apply_punctuation_rules(text, _VQA_DIGIT_COMMA_DIGIT)
    return _map_words(text)


def normalize_textvqa_answer(answer: str) -> str:
    """Normalise an answer as the EvalAI answer processor used for TextVQA does.

    First its "word tokenisation": lower-case, delete every comma and question mark, split "'s" off
    the preceding word ("man's" -> "man 's"), strip; then the VQA steps (with its own
    digit-comma-digit test, which can no longer fire since the commas are gone).
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _apply_punctuation_rules(text, _EVALAI_DIGIT_COMMAS_DIGIT)
    return _map_words(text)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA v2 soft accuracy of one prediction against its 10 human answers, in [0, 1].

    Raises:
        TypeError: prediction or an answer is not a str.
        ValueError: not exactly 10 answers.
    """
    _check_prediction_and_answers(prediction, answers, "vqa_accuracy")
    return _soft_accuracy(prediction, answers, normalize_vqa_answer)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA soft accuracy (EvalAI normalisation) of one prediction against its 10 answers, in [0, 1].

    Raises:
        TypeError: prediction or an answer is not a str.
        ValueError: not exactly 10 answers.
    """
    _check_prediction_and_answers(prediction, answers, "textvqa_accuracy")
    return _soft_accuracy(prediction, answers, normalize_textvqa_answer)


def textvqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the majority normalised answer, else 0.0.

    Tie rule: when several normalised answers share the highest count, the prediction matches if it
    equals any of them. This keeps the score independent of the annotators' order (a "first most
    common" rule would not be).

    Raises:
        TypeError: prediction or an answer is not a str.
        ValueError: not exactly 10 answers.
    """
    _check_prediction_and_answers(prediction, answers, "textvqa_exact_match")
    counts = Counter(normalize_textvqa_answer(answer) for answer in answers)
    top_count = max(counts.values())
    majority = {answer for answer, count in counts.items() if count == top_count}
    return 1.0 if normalize_textvqa_answer(prediction) in majority else 0.0


def _soft_accuracy(prediction: str, answers: Sequence[str], normalize: Callable[[str], str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches among the other answers / 3).

    Computed in integers (thirds) and divided once, so 1, 2, 3 matches give exactly 0.3, 0.6, 0.9.
    """
    predicted = normalize(prediction)
    is_match = [normalize(answer) == predicted for answer in answers]
    matches = sum(is_match)
    thirds = sum(min(3, matches - dropped) for dropped in is_match)
    return thirds / (3 * len(answers))


def _apply_punctuation_rules(text: str, digit_comma_digit: re.Pattern[str]) -> str:
    """The official punctuation step: each mark deleted or spaced (decided on ``text``), then periods."""
    delete_every_mark = digit_comma_digit.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_every_mark or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_REMOVAL_LIMIT)


def _map_words(text: str) -> str:
    """Lower-case, split on whitespace, number words -> digits, drop articles, expand contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _check_prediction_and_answers(prediction: str, answers: Sequence[str], metric: str) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"{metric}: prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(
            f"{metric}: answers must be a list of {ANSWERS_PER_QUESTION} str, got {type(answers).__name__}"
        )
    if len(answers) != ANSWERS_PER_QUESTION:
        raise ValueError(f"{metric}: expected exactly {ANSWERS_PER_QUESTION} answers, got {len(answers)}")
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise TypeError(f"{metric}: answers[{index}] must be a str, got {type(answer).__name__}")
