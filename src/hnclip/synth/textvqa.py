"""TextVQA-style items: a sign with one or two large glyphs, a question, ten answers, and noisy OCR tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hnclip.synth.vocabulary import CONFUSABLE_GLYPHS, DIGITS, GLYPHS, LETTERS

N_ANNOTATORS = 10
OCR_SUBSTITUTION_RATE = 0.08  # one glyph misread as a look-alike
OCR_MISS_RATE = 0.04  # the word not detected at all
OCR_SPURIOUS_RATE = 0.06  # a phantom token from the backdrop
IMAGE_CLASSES = ("Sign", "Street sign", "Signage", "Billboard", "Poster")


@dataclass(frozen=True)
class TextQuestion:
    question: str
    answer: str  # lower case, as TextVQA's annotators mostly type
    confusions: tuple[str, ...]


def draw_word(rng: random.Random, excluded: frozenset[str] = frozenset(), forced: tuple[str, ...] = ()) -> str:
    """One glyph (a letter or a digit) or two; ``forced`` words are used as given, ``excluded`` never drawn."""
    if forced:
        return rng.choice(forced)
    while True:
        if rng.random() < 0.5:
            word = rng.choice(LETTERS) if rng.random() < 0.6 else rng.choice(DIGITS)
        else:
            word = rng.choice(GLYPHS) + rng.choice(GLYPHS)
        if word not in excluded:
            return word


def _misread(word: str, rng: random.Random) -> str:
    """The word with one glyph swapped for a look-alike (or any glyph when it has none)."""
    position = rng.randrange(len(word))
    glyph = word[position]
    wrong = CONFUSABLE_GLYPHS.get(glyph) or rng.choice([g for g in GLYPHS if g != glyph])
    return word[:position] + wrong + word[position + 1 :]


def make_question(word: str, rng: random.Random) -> TextQuestion:
    """A question whose answer is read off the sign."""
    lower = word.lower()
    if len(word) == 1:
        noun = "letter" if word in LETTERS else "number"
        template = rng.choice((f"what {noun} is on the sign?", f"what {noun} is written on the sign?"))
        return TextQuestion(template, lower, (_misread(word, rng).lower(),))
    draw = rng.random()
    if draw < 0.6:
        template = rng.choice(("what is written on the sign?", "what does the sign say?"))
        return TextQuestion(template, lower, (_misread(word, rng).lower(), lower[0]))
    position, index = ("first", 0) if draw < 0.8 else ("last", 1)
    return TextQuestion(
        f"what is the {position} character on the sign?",
        lower[index],
        (lower[1 - index], _misread(word[index], rng).lower()),
    )


def annotator_answers(question: TextQuestion, rng: random.Random) -> list[str]:
    """Ten answers: mostly right (some in upper case), a few misreadings, the odd 'unanswerable'."""
    p_wrong = 0.04 if rng.random() < 0.85 else 0.25
    answers = []
    for _ in range(N_ANNOTATORS):
        draw = rng.random()
        if draw < 0.01:
            answers.append("unanswerable")
        elif draw < 0.01 + p_wrong:
            answers.append(rng.choice(question.confusions))
        elif rng.random() < 0.1:
            answers.append(question.answer.upper())
        else:
            answers.append(question.answer)
    return answers


def question_tokens(question: str) -> list[str]:
    return question.rstrip("?").split()


def ocr_entry(
    image_id: str, word: str, word_box: tuple[int, int, int, int], image_size: int, rng: random.Random
) -> dict:
    """A Rosetta-style OCR record: tokens and boxes normalised to [0, 1], with misreads, misses and phantoms."""
    tokens: list[tuple[str, tuple[float, float, float, float]]] = []
    if rng.random() >= OCR_MISS_RATE:
        read = _misread(word, rng) if rng.random() < OCR_SUBSTITUTION_RATE else word
        x, y, w, h = word_box
        tokens.append((read, (x / image_size, y / image_size, w / image_size, h / image_size)))
    if rng.random() < OCR_SPURIOUS_RATE:
        phantom = rng.choice(GLYPHS) + (rng.choice(GLYPHS) if rng.random() < 0.5 else "")
        side = rng.uniform(0.05, 0.12)
        tokens.append((phantom, (rng.uniform(0, 1 - side), rng.uniform(0, 1 - side), side, side)))
    return {
        "image_id": image_id,
        "ocr_tokens": [t for t, _ in tokens],
        "ocr_info": [
            {
                "word": t,
                "bounding_box": {
                    "top_left_x": round(bx, 6),
                    "top_left_y": round(by, 6),
                    "width": round(bw, 6),
                    "height": round(bh, 6),
                    "rotation": 0.0,
                    "roll": 0.0,
                    "pitch": 0.0,
                    "yaw": 0.0,
                },
            }
            for t, (bx, by, bw, bh) in tokens
        ],
    }


def fake_flickr_urls(rng: random.Random) -> tuple[str, str]:
    """Flickr-shaped (original, 300k) URLs that point nowhere, as the real file's fields are URLs."""
    farm, server, photo, secret = (
        rng.randint(1, 9),
        rng.randint(1000, 9999),
        rng.randint(10**9, 10**10),
        rng.getrandbits(40),
    )
    original = f"https://farm{farm}.staticflickr.com/{server}/{photo}_{secret:010x}_o.jpg"
    small = f"https://c{farm}.staticflickr.com/{farm}/{server}/{photo}_{secret:010x}_z.jpg"
    return original, small


def image_classes(rng: random.Random) -> list[str]:
    return sorted(rng.sample(IMAGE_CLASSES, rng.randint(1, 3)))
