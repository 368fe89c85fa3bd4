"""VQA v2-style questions about a scene, and ten annotators' answers with realistic disagreement."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from hnclip.synth.language import Desc, RelClaim
from hnclip.synth.negatives import PairMaker
from hnclip.synth.vocabulary import COLOURS, GENERIC_NOUN, NUMBER_WORDS, OPPOSITE, SHAPES

N_ANNOTATORS = 10
# How often an annotator answers wrongly: most questions are easy, a few are contested.
NOISE_LEVELS: tuple[tuple[float, float], ...] = ((0.80, 0.03), (0.15, 0.15), (0.05, 0.35))
# Surface forms annotators type for the same answer; VQA's normaliser maps most of them together.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "gray": ("grey",),
    **{str(n): (word,) for n, word in NUMBER_WORDS.items()},
}


@dataclass(frozen=True)
class VqaQuestion:
    question: str
    question_type: str  # VQA v2's question-type prefix, e.g. "what color is the"
    answer_type: str  # "yes/no" | "number" | "other"
    answer: str  # the true answer in VQA's normalised form
    confusions: tuple[str, ...]  # wrong answers an annotator might give


class QuestionMaker:
    """Questions of six kinds about one scene graph; ``forbidden`` combinations are never mentioned."""

    KIND_WEIGHTS: dict[str, float] = {
        "colour": 2.0,
        "shape": 1.5,
        "count": 2.0,
        "relation": 2.5,
        "exists": 1.0,
        "what_is_related": 1.0,
    }

    def __init__(self, describer: PairMaker) -> None:
        self.describer = describer
        self.view = describer.view
        self.rng = describer.rng
        self._makers: dict[str, Callable[[], VqaQuestion | None]] = {
            "colour": self._colour,
            "shape": self._shape,
            "count": self._count,
            "relation": self._relation,
            "exists": self._exists,
            "what_is_related": self._what_is_related,
        }

    def questions(self, count: int) -> list[VqaQuestion]:
        """Up to ``count`` distinct questions."""
        names, weights = list(self.KIND_WEIGHTS), list(self.KIND_WEIGHTS.values())
        chosen: list[VqaQuestion] = []
        for _ in range(12 * count):
            if len(chosen) >= count:
                break
            question = self._makers[self.rng.choices(names, weights)[0]]()
            if question is not None and all(q.question != question.question for q in chosen):
                chosen.append(question)
        return chosen

    def _wrong_colours(self, shape: str, answer: str) -> tuple[str, ...]:
        # Even a mistaken annotator never names a held-out colour-shape pair in a train split.
        forbidden = self.describer.forbidden_pairs
        return tuple(c for c in COLOURS if c != answer and (c, shape) not in forbidden)

    def _colour(self) -> VqaQuestion | None:
        target = self.rng.choice(self.describer.ids)
        desc = self.describer.minimal_desc(target, without="colour")
        if desc is None:
            return None
        answer = self.describer.attribute(target, "colour")
        return VqaQuestion(
            f"What color is the {desc.words()}?",
            "what color is the",
            "other",
            answer,
            self._wrong_colours(desc.noun, answer),
        )

    def _shape(self) -> VqaQuestion | None:
        target = self.rng.choice(self.describer.ids)
        colour = self.describer.attribute(target, "colour")
        if self.view.the(Desc(GENERIC_NOUN, colour=colour)) != target:
            return None
        answer = self.describer.shape(target)
        wrong = tuple(s for s in SHAPES if s != answer and (colour, s) not in self.describer.forbidden_pairs)
        return VqaQuestion(f"What is the shape of the {colour} object?", "what is the", "other", answer, wrong)

    def _count(self) -> VqaQuestion | None:
        draw = self.rng.random()
        if draw < 0.6:
            desc = Desc(self.rng.choice(SHAPES))
        elif draw < 0.8:
            desc = Desc(GENERIC_NOUN, colour=self.describer.attribute(self.rng.choice(self.describer.ids), "colour"))
        else:
            desc = Desc(GENERIC_NOUN)
        count = len(self.view.matches(desc))
        wrong = tuple(str(c) for c in (count - 1, count + 1) if c >= 0)
        return VqaQuestion(f"How many {desc.words(plural=True)} are there?", "how many", "number", str(count), wrong)

    def _relation(self) -> VqaQuestion | None:
        triples = self.describer.true_triples()
        if not triples:
            return None
        a, relation, b = self.rng.choice(triples)
        subject, obj = self.describer.minimal_desc(a), self.describer.minimal_desc(b)
        claim = RelClaim(subject, relation, obj)
        if self.rng.random() < 0.5:  # half the answers are "no": a flipped relation or swapped objects
            claim = (
                RelClaim(obj, relation, subject)
                if self.rng.random() < 0.5
                else RelClaim(subject, OPPOSITE[relation], obj)
            )
        if self.describer.mentions_forbidden(claim):
            return None
        answer = "yes" if claim.is_true(self.view) else "no"
        text = f"Is the {claim.subject.words()} {claim.relation} the {claim.object.words()}?"
        return VqaQuestion(text, "is the", "yes/no", answer, ("no" if answer == "yes" else "yes",))

    def _exists(self) -> VqaQuestion | None:
        if self.rng.random() < 0.5:
            desc = self.describer.full_desc(self.rng.choice(self.describer.ids))
        else:
            desc = self.describer.absent_desc()
            if desc is None:
                return None
        answer = "yes" if self.view.matches(desc) else "no"
        return VqaQuestion(
            f"Is there a {desc.words()}?", "is there a", "yes/no", answer, ("no" if answer == "yes" else "yes",)
        )

    def _what_is_related(self) -> VqaQuestion | None:
        anchor = self.rng.choice(self.describer.ids)
        relation = self.rng.choice(list(OPPOSITE))
        related = [x for x in self.describer.ids if x != anchor and self.view.related(x, relation, anchor)]
        if len(related) != 1:
            return None
        answer = self.describer.shape(related[0])
        anchor_desc = self.describer.minimal_desc(anchor)
        wrong = tuple(s for s in SHAPES if s != answer)
        return VqaQuestion(f"What is {relation} the {anchor_desc.words()}?", "what is", "other", answer, wrong)


def _noise_level(rng: random.Random) -> float:
    draw, cumulative = rng.random(), 0.0
    for share, p_wrong in NOISE_LEVELS:
        cumulative += share
        if draw < cumulative:
            return p_wrong
    return NOISE_LEVELS[-1][1]


def _surface_form(answer: str, rng: random.Random) -> str:
    variants = SYNONYMS.get(answer)
    if variants and rng.random() < 0.3:
        return rng.choice(variants)
    return answer


def annotator_answers(question: VqaQuestion, rng: random.Random) -> list[dict]:
    """Ten VQA answers: mostly the truth in varied spellings, sometimes a plausible mistake."""
    p_wrong = _noise_level(rng)
    answers = []
    for answer_id in range(1, N_ANNOTATORS + 1):
        if question.confusions and rng.random() < p_wrong:
            answer = _surface_form(rng.choice(question.confusions), rng)
            confidence = rng.choices(("yes", "maybe", "no"), (0.3, 0.5, 0.2))[0]
        else:
            answer = _surface_form(question.answer, rng)
            confidence = "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": answer, "answer_confidence": confidence, "answer_id": answer_id})
    return answers


def most_common_answer(answers: Sequence[dict]) -> str:
    """VQA's ``multiple_choice_answer``: the most frequent raw answer (ties: the first given)."""
    counts = Counter(a["answer"] for a in answers)
    best = max(counts.values())
    return next(a["answer"] for a in answers if counts[a["answer"]] == best)
