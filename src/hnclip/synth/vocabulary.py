"""The closed vocabulary of the synthetic world: shapes, colours, sizes, relations, numbers, glyphs.

Both the generator and the caption parser read these tables; nothing else about a generated image is shared
between them (the parser sees only the caption string and the written scene graph).
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "shape": "shapes",
}
# "shape" is the generic noun: "the red shape", "there are three shapes" match an object of any shape.
GENERIC_NOUN = "shape"

# Saturated colours far apart in hue and lightness, so they survive a resize to 32 px and JPEG coding.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 215),
    "yellow": (240, 215, 25),
    "purple": (140, 60, 175),
    "gray": (120, 120, 120),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SIZES: tuple[str, ...] = ("small", "large")

# GQA's spatial relation names; the opposite of each is what a predicate flip turns it into.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
# Each relation is stated canonically as (left-or-above object, canonical relation, other object).
CANONICAL_RELATIONS: tuple[str, ...] = ("to the left of", "above")

NUMBER_WORDS: dict[int, str] = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
WORD_NUMBERS: dict[str, int] = {word: n for n, word in NUMBER_WORDS.items()}

# TextVQA signs show letters and digits; confusable pairs drive OCR noise and annotator mistakes.
LETTERS: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS: str = "0123456789"
GLYPHS: str = LETTERS + DIGITS
CONFUSABLE_GLYPHS: dict[str, str] = {
    "O": "0",
    "0": "O",
    "I": "1",
    "1": "I",
    "S": "5",
    "5": "S",
    "B": "8",
    "8": "B",
    "Z": "2",
    "2": "Z",
    "G": "6",
    "6": "G",
    "E": "F",
    "F": "E",
    "P": "R",
    "R": "P",
    "C": "G",
    "U": "V",
    "V": "U",
    "M": "N",
    "N": "M",
    "7": "1",
    "3": "8",
    "Q": "O",
}


def attribute_class(word: str) -> str:
    """'colour' or 'size' for an attribute word; raises KeyError naming the word otherwise."""
    if word in COLOUR_RGB:
        return "colour"
    if word in SIZES:
        return "size"
    raise KeyError(f"{word!r} is not an attribute of the synthetic world")


def vocabulary_summary() -> dict[str, list[str]]:
    """The vocabulary as plain lists, for world.json."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "numbers": [NUMBER_WORDS[n] for n in sorted(NUMBER_WORDS)],
        "glyphs": list(GLYPHS),
    }
