"""Positive captions and their hard negatives, of HNC's kinds, for one scene.

Each maker proposes a true caption and minimal edits of it (an attribute, a noun, a relation, a count, a
quantifier swapped; subject and object exchanged), and keeps the first edit that the scene graph makes false.
Truth is always checked with ``Claim.is_true`` on the scene graph, so a pair is correct by construction.
Relation kinds dominate the mix: they are what plain CLIP training fails to learn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from hnclip.synth.language import (
    COMPARISONS,
    AndAttrClaim,
    AndExistRelClaim,
    AndRelClaim,
    AttrClaim,
    Claim,
    CompareClaim,
    CountClaim,
    Desc,
    RelClaim,
    SceneGraphView,
    VerifyAttrClaim,
    VerifyRelClaim,
    XorAttrClaim,
    XorRelClaim,
    claim_mentions,
)
from hnclip.synth.vocabulary import COLOURS, GENERIC_NOUN, NUMBER_WORDS, OPPOSITE, RELATIONS, SHAPES, SIZES
from hnclip.synth.world import HeldOut

# HNC's 17 train/val types, with how often each is drawn.
TRAIN_TYPE_WEIGHTS: dict[str, float] = {
    "attribute": 1.0,
    "object": 1.0,
    "attribute_subg": 1.5,
    "relation_subj": 3.0,
    "relation_obj": 3.0,
    "relation_pred": 3.0,
    "relation_attr_subj": 2.0,
    "relation_attr_obj": 2.0,
    "relation_attr_pred": 2.0,
    "obj_count": 1.0,
    "obj_comp_count": 1.0,
    "obj_verify_count": 1.0,
    "obj_verify_count_attr": 1.0,
    "and_logic_attr": 1.0,
    "and_logic_rel": 1.0,
    "xor_logic_attr": 1.0,
    "xor_logic_rel": 1.0,
}
TRAIN_TYPES: tuple[str, ...] = tuple(TRAIN_TYPE_WEIGHTS)

# HNC's 10 test type names and the train/val kind each is generated as (docs/data.md; hnclip.data.hnc.TEST_TYPE_EQUIVALENTS).
TEST_TYPE_SOURCES: dict[str, tuple[str, ...]] = {
    "relation": ("relation_subj", "relation_obj", "relation_pred"),
    "attribute_relation": ("attribute_subg",),
    "relation_attribute": ("relation_attr_subj", "relation_attr_obj", "relation_attr_pred"),
    "verify_object_attribute": ("obj_verify_count_attr",),
    "verify_object_relation": ("obj_verify_count",),
    "object_count": ("obj_count",),
    "object_compare_count": ("obj_comp_count",),
    "and_logic_relation": ("and_logic_rel",),
    "xor_logic_attribute": ("xor_logic_attr",),
    "xor_logic_relation": ("xor_logic_rel",),
}
TEST_TYPE_WEIGHTS: dict[str, float] = {
    "relation": 6.0,
    "attribute_relation": 1.5,
    "relation_attribute": 4.0,
    "verify_object_attribute": 1.0,
    "verify_object_relation": 1.0,
    "object_count": 1.0,
    "object_compare_count": 1.0,
    "and_logic_relation": 1.0,
    "xor_logic_attribute": 1.0,
    "xor_logic_relation": 1.0,
}
TEST_TYPES: tuple[str, ...] = tuple(TEST_TYPE_SOURCES)


@dataclass(frozen=True)
class CaptionPair:
    """A true caption, its hard negative, and what the edit replaced (HNC's ``replaced``: original, new)."""

    kind: str
    positive: Claim
    negative: Claim
    original: str
    replacement: str


def true_triples(ids: Sequence[str], view) -> list[tuple[str, str, str]]:
    """Every (subject, relation, object) the scene ``view`` makes true, subjects and objects in ``ids`` order."""
    return [
        (a, relation, b)
        for a in ids
        for b in ids
        if a != b
        for relation in RELATIONS
        if view.related(a, relation, b)
    ]


class PairMaker:
    """Makes caption pairs for one scene graph; ``forbidden`` combinations never appear in a caption."""

    def __init__(self, entry: dict, rng: random.Random, forbidden: HeldOut | None = None) -> None:
        self.view = SceneGraphView(entry)
        self.rng = rng
        self.ids = list(self.view.objects)
        self.forbidden_pairs = set(forbidden.colour_shape) if forbidden else set()
        self.forbidden_triples = set(forbidden.relation) if forbidden else set()
        self._makers: dict[str, Callable[[], CaptionPair | None]] = {
            "attribute": self._attribute,
            "object": self._object,
            "attribute_subg": self._attribute_subgraph,
            "relation_subj": lambda: self._relation_entity("relation_subj", self.minimal_desc, "subject"),
            "relation_obj": lambda: self._relation_entity("relation_obj", self.minimal_desc, "object"),
            "relation_pred": lambda: self._relation_predicate("relation_pred", self.minimal_desc),
            "relation_attr_subj": lambda: self._relation_entity("relation_attr_subj", self.full_desc, "subject"),
            "relation_attr_obj": lambda: self._relation_entity("relation_attr_obj", self.full_desc, "object"),
            "relation_attr_pred": lambda: self._relation_predicate("relation_attr_pred", self.full_desc),
            "obj_count": self._count,
            "obj_comp_count": self._compare_count,
            "obj_verify_count": self._verify_relation,
            "obj_verify_count_attr": self._verify_attribute,
            "and_logic_attr": self._and_attribute,
            "and_logic_rel": self._and_relation,
            "xor_logic_attr": self._xor_attribute,
            "xor_logic_rel": self._xor_relation,
        }

    # ------------------------------------------------------------ entry point

    def make(self, kind: str) -> CaptionPair | None:
        """A pair of ``kind``, or None when this scene cannot support one."""
        if kind not in self._makers:
            raise KeyError(f"unknown caption type {kind!r}")
        return self._makers[kind]()

    def mentions_forbidden(self, claim: Claim) -> bool:
        pairs, triples = claim_mentions(claim)
        return bool(pairs & self.forbidden_pairs or triples & self.forbidden_triples)

    def involved_objects(self, *claims: Claim) -> list[str]:
        """Scene objects any description of the claims matches, in scene order (HNC's ``bboxes``)."""
        found = {x for claim in claims for desc in claim.descs() for x in self.view.matches(desc)}
        return [x for x in self.ids if x in found]

    # ------------------------------------------------------------ scene queries

    def shape(self, object_id: str) -> str:
        return self.view.objects[object_id]["name"]

    def attribute(self, object_id: str, kind: str) -> str:
        options = COLOURS if kind == "colour" else SIZES
        return next(a for a in self.view.objects[object_id]["attributes"] if a in options)

    def minimal_desc(self, object_id: str, without: str | None = None) -> Desc | None:
        """The shortest description picking out the object, optionally not using one attribute kind.

        A quarter of the time a longer unique description is preferred, so captions vary.
        """
        shape, colour, size = (
            self.shape(object_id),
            self.attribute(object_id, "colour"),
            self.attribute(object_id, "size"),
        )
        candidates = [Desc(shape)]
        if without != "colour":
            candidates.append(Desc(shape, colour=colour))
        if without != "size":
            candidates.append(Desc(shape, size=size))
        unique = [d for d in candidates if self.view.the(d) == object_id]
        if not unique:
            return None
        if len(unique) > 1 and self.rng.random() < 0.25:
            return self.rng.choice(unique[1:])
        return unique[0]

    def full_desc(self, object_id: str) -> Desc:
        """Colour and shape: unique because no scene repeats a colour-shape combination."""
        return Desc(self.shape(object_id), colour=self.attribute(object_id, "colour"))

    def true_triples(self) -> list[tuple[str, str, str]]:
        return true_triples(self.ids, self.view)

    # ------------------------------------------------------------ shared machinery

    def _first_false(self, kind: str, positive: Claim, edits: Iterable[tuple[Claim, str, str]]) -> CaptionPair | None:
        """Pair the positive with the first edit that is false and allowed."""
        if not positive.is_true(self.view) or self.mentions_forbidden(positive):
            return None
        for negative, original, replacement in edits:
            if negative.text() == positive.text():
                continue
            if not negative.is_true(self.view) and not self.mentions_forbidden(negative):
                return CaptionPair(kind, positive, negative, original, replacement)
        return None

    def _shuffled(self, items: Sequence) -> list:
        return self.rng.sample(list(items), len(items))

    def _attribute_kind(self) -> str:
        return "colour" if self.rng.random() < 0.65 else "size"

    def _other_values(self, kind: str, value: str) -> list[str]:
        return self._shuffled([v for v in (COLOURS if kind == "colour" else SIZES) if v != value])

    def _other_shapes(self, shape: str) -> list[str]:
        """Other shapes, those in the scene first: "the square is red" is harder when there is a square."""
        present = {self.shape(x) for x in self.ids}
        others = [s for s in SHAPES if s != shape]
        return self._shuffled([s for s in others if s in present]) + self._shuffled(
            [s for s in others if s not in present]
        )

    def _relation_edits(self, relation: str) -> list[str]:
        """Replacement relations, the opposite first most of the time (a flip keeps the bag of words)."""
        others = self._shuffled([r for r in RELATIONS if r not in (relation, OPPOSITE[relation])])
        if self.rng.random() < 0.7:
            return [OPPOSITE[relation], *others]
        return [*others, OPPOSITE[relation]]

    # ------------------------------------------------------------ attribute kinds

    def _described_attribute(self) -> tuple[Desc, str, str] | None:
        """A random object's description that leaves out one random attribute kind, that kind and its value."""
        target = self.rng.choice(self.ids)
        kind = self._attribute_kind()
        subject = self.minimal_desc(target, without=kind)
        if subject is None:
            return None
        return subject, kind, self.attribute(target, kind)

    def _attribute(self) -> CaptionPair | None:
        described = self._described_attribute()
        if described is None:
            return None
        subject, kind, value = described
        edits = ((AttrClaim(subject, v), value, v) for v in self._other_values(kind, value))
        return self._first_false("attribute", AttrClaim(subject, value), edits)

    def _object(self) -> CaptionPair | None:
        described = self._described_attribute()
        if described is None:
            return None
        subject, _, value = described
        edits = (
            (AttrClaim(replace(subject, noun=s), value), subject.noun, s) for s in self._other_shapes(subject.noun)
        )
        return self._first_false("object", AttrClaim(subject, value), edits)

    def _attribute_subgraph(self) -> CaptionPair | None:
        triples = self.true_triples()
        if not triples:
            return None
        a, relation, b = self.rng.choice(triples)
        kind = self._attribute_kind()  # "colour" or "size": also the name of the Desc field
        value = self.attribute(a, kind)
        subject = Desc(self.shape(a), **{kind: value})
        obj = self.minimal_desc(b)
        if self.view.the(subject) != a or obj is None:
            return None
        edits = (
            (RelClaim(replace(subject, **{kind: v}), relation, obj), value, v) for v in self._other_values(kind, value)
        )
        return self._first_false("attribute_subg", RelClaim(subject, relation, obj), edits)

    # ------------------------------------------------------------ relation kinds

    def _relation_entity(self, kind: str, describe: Callable[[str], Desc | None], role: str) -> CaptionPair | None:
        """Replace the subject (or object) by another object of the scene; the other end itself means a swap."""
        triples = self.true_triples()
        if not triples:
            return None
        a, relation, b = self.rng.choice(triples)
        desc = {x: describe(x) for x in self.ids}
        if desc[a] is None or desc[b] is None:
            return None
        kept, replaced_id = (b, a) if role == "subject" else (a, b)
        edits = []
        for other in self._shuffled([x for x in self.ids if x != replaced_id]):
            if desc[other] is None:
                continue
            if other == kept:  # subject and object exchange places
                negative = RelClaim(desc[b], relation, desc[a])
            elif role == "subject":
                negative = RelClaim(desc[other], relation, desc[b])
            else:
                negative = RelClaim(desc[a], relation, desc[other])
            edits.append((negative, desc[replaced_id].words(), desc[other].words()))
        return self._first_false(kind, RelClaim(desc[a], relation, desc[b]), edits)

    def _relation_predicate(self, kind: str, describe: Callable[[str], Desc | None]) -> CaptionPair | None:
        triples = self.true_triples()
        if not triples:
            return None
        a, relation, b = self.rng.choice(triples)
        subject, obj = describe(a), describe(b)
        if subject is None or obj is None:
            return None
        edits = ((RelClaim(subject, r, obj), relation, r) for r in self._relation_edits(relation))
        return self._first_false(kind, RelClaim(subject, relation, obj), edits)

    # ------------------------------------------------------------ counting kinds

    def _count_noun(self) -> Desc:
        target = self.rng.choice(self.ids)
        draw = self.rng.random()
        if draw < 0.6:
            return Desc(self.shape(target))
        if draw < 0.8:
            return Desc(GENERIC_NOUN, colour=self.attribute(target, "colour"))
        return Desc(GENERIC_NOUN)

    def _count(self) -> CaptionPair | None:
        noun = self._count_noun()
        count = len(self.view.matches(noun))
        near = [c for c in (count - 1, count + 1) if 1 <= c <= max(NUMBER_WORDS)]
        far = [c for c in NUMBER_WORDS if c >= 1 and c not in near and c != count]
        edits = (
            (CountClaim(noun, c), NUMBER_WORDS[count], NUMBER_WORDS[c])
            for c in self._shuffled(near) + self._shuffled(far)
        )
        return self._first_false("obj_count", CountClaim(noun, count), edits)

    def _compare_count(self) -> CaptionPair | None:
        first = self.shape(self.rng.choice(self.ids))
        second = self.rng.choice([s for s in SHAPES if s != first])
        if self.rng.random() < 0.5:
            first, second = second, first
        counts = {s: len(self.view.matches(Desc(s))) for s in (first, second)}
        truth = "more" if counts[first] > counts[second] else "fewer" if counts[first] < counts[second] else "as many"
        edits = (
            (CompareClaim(Desc(first), c, Desc(second)), truth, c)
            for c in self._shuffled([c for c in COMPARISONS if c != truth])
        )
        return self._first_false("obj_comp_count", CompareClaim(Desc(first), truth, Desc(second)), edits)

    def _verify_relation(self) -> CaptionPair | None:
        """'There is at least one X that is R the Y' against 'There is no X ...', either one true."""
        exists = self.rng.random() < 0.5
        present = {self.shape(x) for x in self.ids}
        options = []
        for anchor in self.ids:
            obj = self.minimal_desc(anchor)
            for shape in present - {self.shape(anchor)}:
                for relation in RELATIONS:
                    claim = VerifyRelClaim(exists, Desc(shape), relation, obj)
                    if claim.is_true(self.view) and not self.mentions_forbidden(claim):
                        options.append(claim)
        if not options:
            return None
        positive = self.rng.choice(sorted(options, key=lambda c: c.text()))
        negative = replace(positive, exists=not exists)
        return self._first_false("obj_verify_count", positive, [(negative, *_quantifier_words(exists))])

    def _verify_attribute(self) -> CaptionPair | None:
        exists = self.rng.random() < 0.5
        present = sorted({self.shape(x) for x in self.ids})
        options = [VerifyAttrClaim(exists, Desc(shape), value) for shape in present for value in (*COLOURS, *SIZES)]
        options = [c for c in options if c.is_true(self.view) and not self.mentions_forbidden(c)]
        if not options:
            return None
        positive = self.rng.choice(options)
        negative = replace(positive, exists=not exists)
        return self._first_false("obj_verify_count_attr", positive, [(negative, *_quantifier_words(exists))])

    # ------------------------------------------------------------ logic kinds

    def _existence_desc(self, object_id: str) -> Desc:
        if self.rng.random() < 0.7:
            return self.full_desc(object_id)
        return Desc(self.shape(object_id), size=self.attribute(object_id, "size"))

    def _attribute_edits(self, desc: Desc) -> list[tuple[Desc, str, str]]:
        """The description with its colour or size changed: (new desc, old value, new value)."""
        kind = "colour" if desc.colour else "size"
        value = getattr(desc, kind)
        return [(replace(desc, **{kind: v}), value, v) for v in self._other_values(kind, value)]

    def _and_attribute(self) -> CaptionPair | None:
        if len(self.ids) < 2:
            return None
        a, b = self.rng.sample(self.ids, 2)
        first, second = self._existence_desc(a), self._existence_desc(b)
        if first == second:
            return None
        edits = []
        for position in self._shuffled([0, 1]):
            for new, old_value, new_value in self._attribute_edits((first, second)[position]):
                pair = (new, second) if position == 0 else (first, new)
                edits.append((AndAttrClaim(*pair), old_value, new_value))
        return self._first_false("and_logic_attr", AndAttrClaim(first, second), edits)

    def _and_relation(self) -> CaptionPair | None:
        triples = self.true_triples()
        if len(triples) < 2:
            return None
        same_subject = [(t1, t2) for t1 in triples for t2 in triples if t1[0] == t2[0] and t1 < t2]
        if same_subject and self.rng.random() < 0.5:
            return self._and_relation_same_subject(*self.rng.choice(same_subject))
        t1, t2 = self.rng.sample(triples, 2)
        return self._and_relation_existential(t1, t2)

    def _and_relation_same_subject(self, t1, t2) -> CaptionPair | None:
        subject, o1, o2 = self.minimal_desc(t1[0]), self.minimal_desc(t1[2]), self.minimal_desc(t2[2])
        if None in (subject, o1, o2):
            return None
        positive = AndRelClaim(subject, t1[1], o1, t2[1], o2)
        return self._first_false("and_logic_rel", positive, self._either_relation_edits(positive, t1, t2))

    def _and_relation_existential(self, t1, t2) -> CaptionPair | None:
        o1, o2 = self.minimal_desc(t1[2]), self.minimal_desc(t2[2])
        if o1 is None or o2 is None:
            return None
        positive = AndExistRelClaim(Desc(self.shape(t1[0])), t1[1], o1, Desc(self.shape(t2[0])), t2[1], o2)
        if positive.first_subject == positive.second_subject and t1[1:] == t2[1:]:
            return None
        return self._first_false("and_logic_rel", positive, self._either_relation_edits(positive, t1, t2))

    def _either_relation_edits(self, positive, t1, t2) -> list:
        """Edits of a two-relation claim that change one of its relations, the two relations in random order."""
        edits = []
        for position in self._shuffled([0, 1]):
            old = (t1, t2)[position][1]
            for r in self._relation_edits(old):
                edit = replace(positive, first_relation=r) if position == 0 else replace(positive, second_relation=r)
                edits.append((edit, old, r))
        return edits

    def absent_desc(self) -> Desc | None:
        """A colour-shape description matching nothing in the scene, preferably of a shape that is there."""
        present_shapes = {self.shape(x) for x in self.ids}
        options = [Desc(s, colour=c) for s in SHAPES for c in COLOURS if not self.view.matches(Desc(s, colour=c))]
        options = [d for d in options if (d.colour, d.noun) not in self.forbidden_pairs]
        preferred = [d for d in options if d.noun in present_shapes]
        pool = preferred or options
        return self.rng.choice(pool) if pool else None

    def _xor_attribute(self) -> CaptionPair | None:
        present = self._existence_desc(self.rng.choice(self.ids))
        absent = self.absent_desc()
        if absent is None:
            return None
        swap = self.rng.random() < 0.5
        order = (absent, present) if swap else (present, absent)
        positive = XorAttrClaim(*order)
        absent_at, present_at = (0, 1) if swap else (1, 0)
        edits = []
        # Make the absent disjunct true (both hold) or the present one false (neither holds).
        for position in self._shuffled([absent_at, present_at]):
            for new, old_value, new_value in self._attribute_edits(order[position]):
                pair = (new, order[1]) if position == 0 else (order[0], new)
                edits.append((XorAttrClaim(*pair), old_value, new_value))
        return self._first_false("xor_logic_attr", positive, edits)

    def _xor_relation(self) -> CaptionPair | None:
        triples = self.true_triples()
        if not triples:
            return None
        a, relation, b = self.rng.choice(triples)
        subject, hit = self.minimal_desc(a), self.minimal_desc(b)
        others = [x for x in self.ids if x not in (a, b) and not self.view.related(a, relation, x)]
        miss = self.minimal_desc(self.rng.choice(others)) if others else self.absent_desc()
        if None in (subject, hit, miss):
            return None
        first, second = (hit, miss) if self.rng.random() < 0.5 else (miss, hit)
        positive = XorRelClaim(subject, relation, first, second)
        edits = ((replace(positive, relation=r), relation, r) for r in self._relation_edits(relation))
        return self._first_false("xor_logic_rel", positive, edits)


def _quantifier_words(exists: bool) -> tuple[str, str]:
    return ("at least one", "no") if exists else ("no", "at least one")


def draw_pairs(
    maker: PairMaker,
    count: int,
    type_weights: dict[str, float],
    type_sources: dict[str, tuple[str, ...]] | None = None,
    prefer: Callable[[CaptionPair], bool] | None = None,
) -> list[tuple[str, CaptionPair]]:
    """Up to ``count`` pairs with distinct positives, as (type name, pair).

    ``type_sources`` maps a written type name to the kinds it is generated as (the test file's names);
    ``prefer`` marks pairs to favour (held-out combinations in test splits): up to half the slots go to them.
    """
    chosen: list[tuple[str, CaptionPair]] = []
    seen: set[str] = set()
    if prefer is not None:
        _fill(maker, chosen, seen, count // 2, type_weights, type_sources, prefer)
    _fill(maker, chosen, seen, count, type_weights, type_sources, None)
    return chosen


def _fill(maker, chosen, seen, target, type_weights, type_sources, prefer) -> None:
    """Draw pairs into ``chosen`` until it holds ``target`` (or the tries run out: a sparse scene)."""
    rng = maker.rng
    names, weights = list(type_weights), list(type_weights.values())
    for _ in range(12 * max(0, target - len(chosen))):
        if len(chosen) >= target:
            return
        name = rng.choices(names, weights)[0]
        kind = rng.choice(type_sources[name]) if type_sources else name
        pair = maker.make(kind)
        if pair is None or pair.positive.text() in seen or (prefer is not None and not prefer(pair)):
            continue
        seen.add(pair.positive.text())
        chosen.append((name, pair))
