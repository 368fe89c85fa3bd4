"""The caption language of the synthetic world: claims, their English text, a parser, and their truth.

A caption is one of a dozen sentence forms modelled on HNC's templates, e.g.
  "The red circle is to the left of the square."             (RelClaim)
  "There is at least one triangle that is above the circle."  (VerifyRelClaim)
  "There is either a large square or a blue cross."          (XorAttrClaim)
Each form is a frozen dataclass with ``text()`` (English) and ``is_true(view)``: its meaning evaluated on a
scene graph in GQA's format. ``parse_caption`` turns text back into a claim using only the vocabulary, so
``caption_is_true(text, scene_graph_entry)`` checks a written caption against a written scene graph, with no
access to how either was generated.

Meaning, precisely:
- "the D" must pick out exactly one object, or the claim is false (a failed definite description);
  "a D" / "at least one D" / "no D" quantify over all matching objects. A description matches an object when
  its noun is the object's name (or the generic "shape") and each of its attributes is among the object's.
- Relations are the scene graph's relation names; "X is R the Y" needs X and Y to be different objects.
- Counts are exact ("there are two circles" is false with three); "either ... or" is exclusive; inside
  "the D is R either the A or the B", a disjunct whose description fails to refer is simply false.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from hnclip.synth.vocabulary import (
    COLOURS,
    GENERIC_NOUN,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORD_NUMBERS,
)
from hnclip.synth.world import canonical_triple

COMPARISONS = ("more", "fewer", "as many")
NOUNS = (*SHAPES, GENERIC_NOUN)
SINGULARS = {plural: singular for singular, plural in PLURALS.items()}


# ---------------------------------------------------------------- scene-graph view


class SceneGraphView:
    """Read-only queries on one GQA scene-graph entry ({"width", "height", "objects": {id: {...}}})."""

    def __init__(self, entry: dict) -> None:
        self.objects: dict[str, dict] = entry["objects"]
        self._relations = {
            (object_id, rel["name"], rel["object"])
            for object_id, obj in self.objects.items()
            for rel in obj.get("relations", [])
        }
        self._matches: dict[Desc, list[str]] = {}

    def matches(self, desc: "Desc") -> list[str]:
        """Ids of the objects ``desc`` describes, in scene-graph order (memoised: generators ask often)."""
        found = self._matches.get(desc)
        if found is None:
            found = [object_id for object_id, obj in self.objects.items() if desc.describes(obj)]
            self._matches[desc] = found
        return found

    def the(self, desc: "Desc") -> str | None:
        """The single object ``desc`` picks out, or None when it picks out none or several."""
        found = self.matches(desc)
        return found[0] if len(found) == 1 else None

    def related(self, subject_id: str, relation: str, object_id: str) -> bool:
        return (subject_id, relation, object_id) in self._relations

    def has_attribute(self, object_id: str, attribute: str) -> bool:
        return attribute in self.objects[object_id]["attributes"]


# ---------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class Desc:
    """A noun phrase without its determiner: [size] [colour] noun, e.g. "large red circle"."""

    noun: str
    colour: str | None = None
    size: str | None = None

    def words(self, plural: bool = False) -> str:
        noun = PLURALS[self.noun] if plural else self.noun
        return " ".join(w for w in (self.size, self.colour, noun) if w)

    def modifiers(self) -> str:
        return " ".join(w for w in (self.size, self.colour) if w)

    def describes(self, obj: dict) -> bool:
        if self.noun != GENERIC_NOUN and obj["name"] != self.noun:
            return False
        attributes = obj["attributes"]
        return (self.colour is None or self.colour in attributes) and (self.size is None or self.size in attributes)

    def is_concrete(self) -> bool:
        return self.noun != GENERIC_NOUN


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _indefinite(desc: Desc) -> str:
    words = desc.words()
    return f"{_article(words)} {words}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _count_phrase(count: int, desc: Desc) -> str:
    if count == 1:
        return f"there is one {desc.words()}"
    return f"there are {NUMBER_WORDS[count]} {desc.words(plural=True)}"


# ---------------------------------------------------------------- claims


class Claim:
    """A sentence form. Subclasses define text(), is_true(view), descs(), triples(), attributions()."""

    def text(self) -> str:
        raise NotImplementedError

    def is_true(self, view: SceneGraphView) -> bool:
        raise NotImplementedError

    def descs(self) -> Iterator[Desc]:
        raise NotImplementedError

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        """The (subject, relation, object) statements the caption makes or denies."""
        return iter(())

    def attributions(self) -> Iterator[tuple[Desc, str]]:
        """The (description, attribute) predications the caption makes or denies."""
        return iter(())


@dataclass(frozen=True)
class AttrClaim(Claim):
    """The D is A."""

    subject: Desc
    attribute: str

    def text(self) -> str:
        return _sentence(f"the {self.subject.words()} is {self.attribute}")

    def is_true(self, view: SceneGraphView) -> bool:
        target = view.the(self.subject)
        return target is not None and view.has_attribute(target, self.attribute)

    def descs(self) -> Iterator[Desc]:
        yield self.subject

    def attributions(self) -> Iterator[tuple[Desc, str]]:
        yield self.subject, self.attribute


@dataclass(frozen=True)
class RelClaim(Claim):
    """The D is R the E."""

    subject: Desc
    relation: str
    object: Desc

    def text(self) -> str:
        return _sentence(f"the {self.subject.words()} is {self.relation} the {self.object.words()}")

    def is_true(self, view: SceneGraphView) -> bool:
        return _definite_relation_holds(view, self.subject, self.relation, self.object)

    def descs(self) -> Iterator[Desc]:
        yield from (self.subject, self.object)

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        yield self.subject, self.relation, self.object


@dataclass(frozen=True)
class CountClaim(Claim):
    """There is one D / There are N Ds."""

    noun: Desc
    count: int

    def text(self) -> str:
        return _sentence(_count_phrase(self.count, self.noun))

    def is_true(self, view: SceneGraphView) -> bool:
        return len(view.matches(self.noun)) == self.count

    def descs(self) -> Iterator[Desc]:
        yield self.noun


@dataclass(frozen=True)
class CompareClaim(Claim):
    """There are more/fewer Ds than Es / There are as many Ds as Es."""

    first: Desc
    comparison: str
    second: Desc

    def text(self) -> str:
        first, second = self.first.words(plural=True), self.second.words(plural=True)
        if self.comparison == "as many":
            return _sentence(f"there are as many {first} as {second}")
        return _sentence(f"there are {self.comparison} {first} than {second}")

    def is_true(self, view: SceneGraphView) -> bool:
        n_first, n_second = len(view.matches(self.first)), len(view.matches(self.second))
        return {"more": n_first > n_second, "fewer": n_first < n_second, "as many": n_first == n_second}[
            self.comparison
        ]

    def descs(self) -> Iterator[Desc]:
        yield from (self.first, self.second)


def _quantifier(exists: bool) -> str:
    return "there is at least one" if exists else "there is no"


@dataclass(frozen=True)
class VerifyAttrClaim(Claim):
    """There is at least one D that is A / There is no D that is A."""

    exists: bool
    subject: Desc
    attribute: str

    def text(self) -> str:
        return _sentence(f"{_quantifier(self.exists)} {self.subject.words()} that is {self.attribute}")

    def is_true(self, view: SceneGraphView) -> bool:
        found = any(view.has_attribute(x, self.attribute) for x in view.matches(self.subject))
        return found == self.exists

    def descs(self) -> Iterator[Desc]:
        yield self.subject

    def attributions(self) -> Iterator[tuple[Desc, str]]:
        yield self.subject, self.attribute


@dataclass(frozen=True)
class VerifyRelClaim(Claim):
    """There is at least one D that is R the E / There is no D that is R the E."""

    exists: bool
    subject: Desc
    relation: str
    object: Desc

    def text(self) -> str:
        return _sentence(
            f"{_quantifier(self.exists)} {self.subject.words()} that is {self.relation} the {self.object.words()}"
        )

    def is_true(self, view: SceneGraphView) -> bool:
        anchor = view.the(self.object)
        if anchor is None:
            return False
        found = any(x != anchor and view.related(x, self.relation, anchor) for x in view.matches(self.subject))
        return found == self.exists

    def descs(self) -> Iterator[Desc]:
        yield from (self.subject, self.object)

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        yield self.subject, self.relation, self.object


@dataclass(frozen=True)
class AndAttrClaim(Claim):
    """There is both a D and a E ("There is both a red and a blue circle" when the nouns agree)."""

    first: Desc
    second: Desc

    def text(self) -> str:
        if self.first.noun == self.second.noun and self.first.modifiers():
            first = self.first.modifiers()
            return _sentence(f"there is both {_article(first)} {first} and {_indefinite(self.second)}")
        return _sentence(f"there is both {_indefinite(self.first)} and {_indefinite(self.second)}")

    def is_true(self, view: SceneGraphView) -> bool:
        return bool(view.matches(self.first)) and bool(view.matches(self.second))

    def descs(self) -> Iterator[Desc]:
        yield from (self.first, self.second)


@dataclass(frozen=True)
class AndRelClaim(Claim):
    """The D is both R1 the E1 and R2 the E2."""

    subject: Desc
    first_relation: str
    first_object: Desc
    second_relation: str
    second_object: Desc

    def text(self) -> str:
        return _sentence(
            f"the {self.subject.words()} is both {self.first_relation} the {self.first_object.words()} "
            f"and {self.second_relation} the {self.second_object.words()}"
        )

    def is_true(self, view: SceneGraphView) -> bool:
        return _definite_relation_holds(
            view, self.subject, self.first_relation, self.first_object
        ) and _definite_relation_holds(view, self.subject, self.second_relation, self.second_object)

    def descs(self) -> Iterator[Desc]:
        yield from (self.subject, self.first_object, self.second_object)

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        yield self.subject, self.first_relation, self.first_object
        yield self.subject, self.second_relation, self.second_object


@dataclass(frozen=True)
class AndExistRelClaim(Claim):
    """There is both a D1 R1 the E1 and a D2 R2 the E2."""

    first_subject: Desc
    first_relation: str
    first_object: Desc
    second_subject: Desc
    second_relation: str
    second_object: Desc

    def text(self) -> str:
        return _sentence(
            f"there is both {_indefinite(self.first_subject)} {self.first_relation} the "
            f"{self.first_object.words()} and {_indefinite(self.second_subject)} {self.second_relation} the "
            f"{self.second_object.words()}"
        )

    def is_true(self, view: SceneGraphView) -> bool:
        return _some_related(view, self.first_subject, self.first_relation, self.first_object) and _some_related(
            view, self.second_subject, self.second_relation, self.second_object
        )

    def descs(self) -> Iterator[Desc]:
        yield from (self.first_subject, self.first_object, self.second_subject, self.second_object)

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        yield self.first_subject, self.first_relation, self.first_object
        yield self.second_subject, self.second_relation, self.second_object


@dataclass(frozen=True)
class XorAttrClaim(Claim):
    """There is either a D or a E (exactly one of them)."""

    first: Desc
    second: Desc

    def text(self) -> str:
        return _sentence(f"there is either {_indefinite(self.first)} or {_indefinite(self.second)}")

    def is_true(self, view: SceneGraphView) -> bool:
        return bool(view.matches(self.first)) != bool(view.matches(self.second))

    def descs(self) -> Iterator[Desc]:
        yield from (self.first, self.second)


@dataclass(frozen=True)
class XorRelClaim(Claim):
    """The D is R either the E1 or the E2 (exactly one of them)."""

    subject: Desc
    relation: str
    first_object: Desc
    second_object: Desc

    def text(self) -> str:
        return _sentence(
            f"the {self.subject.words()} is {self.relation} either the {self.first_object.words()} "
            f"or the {self.second_object.words()}"
        )

    def is_true(self, view: SceneGraphView) -> bool:
        if view.the(self.subject) is None:
            return False
        first = _definite_relation_holds(view, self.subject, self.relation, self.first_object)
        second = _definite_relation_holds(view, self.subject, self.relation, self.second_object)
        return first != second

    def descs(self) -> Iterator[Desc]:
        yield from (self.subject, self.first_object, self.second_object)

    def triples(self) -> Iterator[tuple[Desc, str, Desc]]:
        yield self.subject, self.relation, self.first_object
        yield self.subject, self.relation, self.second_object


def _definite_relation_holds(view: SceneGraphView, subject: Desc, relation: str, obj: Desc) -> bool:
    subject_id, object_id = view.the(subject), view.the(obj)
    return (
        subject_id is not None
        and object_id is not None
        and subject_id != object_id
        and view.related(subject_id, relation, object_id)
    )


def _some_related(view: SceneGraphView, subject: Desc, relation: str, obj: Desc) -> bool:
    anchor = view.the(obj)
    return anchor is not None and any(x != anchor and view.related(x, relation, anchor) for x in view.matches(subject))


# ---------------------------------------------------------------- mentions (held-out checks)


def claim_mentions(claim: Claim) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    """Colour-shape pairs and canonical shape-relation-shape triples a caption names (true or not)."""
    pairs = {(d.colour, d.noun) for d in claim.descs() if d.colour and d.is_concrete()}
    pairs |= {(attr, d.noun) for d, attr in claim.attributions() if attr in COLOURS and d.is_concrete()}
    triples = {
        canonical_triple(s.noun, relation, o.noun)
        for s, relation, o in claim.triples()
        if s.is_concrete() and o.is_concrete()
    }
    return pairs, triples


# ---------------------------------------------------------------- parser


class _Tokens:
    """A cursor over a caption's lower-case words, with the caption kept for error messages."""

    def __init__(self, caption: str) -> None:
        self.caption = caption
        text = caption.strip().lower()
        text = text[:-1].rstrip() if text.endswith(".") else text
        self.words = text.split()
        self.pos = 0

    def fail(self, expected: str) -> ValueError:
        found = " ".join(self.words[self.pos :]) or "the end"
        return ValueError(f"cannot parse caption {self.caption!r}: expected {expected} at {found!r}")

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def accept(self, phrase: str) -> bool:
        parts = phrase.split()
        if self.words[self.pos : self.pos + len(parts)] == parts:
            self.pos += len(parts)
            return True
        return False

    def expect(self, phrase: str) -> None:
        if not self.accept(phrase):
            raise self.fail(repr(phrase))

    def accept_one_of(self, options: Iterable[str]) -> str | None:
        word = self.peek()
        if word is not None and word in options:
            self.pos += 1
            return word
        return None

    def at_end(self) -> bool:
        return self.pos == len(self.words)


def _parse_desc(tokens: _Tokens, plural: bool = False, noun_optional: bool = False) -> Desc | None:
    """[size] [colour] noun; with ``noun_optional`` a bare modifier list returns a Desc with noun ''."""
    size = tokens.accept_one_of(SIZES)
    colour = tokens.accept_one_of(COLOURS)
    word = tokens.peek()
    if plural and word in SINGULARS:
        tokens.pos += 1
        return Desc(SINGULARS[word], colour, size)
    if not plural and word in NOUNS:
        tokens.pos += 1
        return Desc(word, colour, size)
    if noun_optional and (size or colour):
        return Desc("", colour, size)
    raise tokens.fail("a plural noun" if plural else "a noun")


def _parse_relation(tokens: _Tokens) -> str:
    for relation in RELATIONS:
        if tokens.accept(relation):
            return relation
    raise tokens.fail("a relation")


def _starts_relation(tokens: _Tokens) -> bool:
    return any(tokens.words[tokens.pos : tokens.pos + len(r.split())] == r.split() for r in RELATIONS)


def _parse_article(tokens: _Tokens) -> None:
    if tokens.accept_one_of(("a", "an")) is None:
        raise tokens.fail("'a' or 'an'")


def _parse_definite_claim(tokens: _Tokens) -> Claim:
    subject = _parse_desc(tokens)
    tokens.expect("is")
    if tokens.accept("both"):
        first_relation = _parse_relation(tokens)
        tokens.expect("the")
        first_object = _parse_desc(tokens)
        tokens.expect("and")
        second_relation = _parse_relation(tokens)
        tokens.expect("the")
        return AndRelClaim(subject, first_relation, first_object, second_relation, _parse_desc(tokens))
    attribute = tokens.accept_one_of((*COLOURS, *SIZES))
    if attribute is not None:
        return AttrClaim(subject, attribute)
    relation = _parse_relation(tokens)
    if tokens.accept("either the"):
        first_object = _parse_desc(tokens)
        tokens.expect("or the")
        return XorRelClaim(subject, relation, first_object, _parse_desc(tokens))
    tokens.expect("the")
    return RelClaim(subject, relation, _parse_desc(tokens))


def _parse_verify(tokens: _Tokens, exists: bool) -> Claim:
    subject = _parse_desc(tokens)
    tokens.expect("that is")
    attribute = tokens.accept_one_of((*COLOURS, *SIZES))
    if attribute is not None:
        return VerifyAttrClaim(exists, subject, attribute)
    relation = _parse_relation(tokens)
    tokens.expect("the")
    return VerifyRelClaim(exists, subject, relation, _parse_desc(tokens))


def _parse_both(tokens: _Tokens) -> Claim:
    _parse_article(tokens)
    first = _parse_desc(tokens, noun_optional=True)
    if first.noun and _starts_relation(tokens):
        first_relation = _parse_relation(tokens)
        tokens.expect("the")
        first_object = _parse_desc(tokens)
        tokens.expect("and")
        _parse_article(tokens)
        second_subject = _parse_desc(tokens)
        second_relation = _parse_relation(tokens)
        tokens.expect("the")
        return AndExistRelClaim(
            first, first_relation, first_object, second_subject, second_relation, _parse_desc(tokens)
        )
    tokens.expect("and")
    _parse_article(tokens)
    second = _parse_desc(tokens)
    if not first.noun:  # "both a red and a blue circle": the first noun is the second's
        first = replace(first, noun=second.noun)
    return AndAttrClaim(first, second)


def _parse_there_claim(tokens: _Tokens) -> Claim:
    if tokens.accept("is at least one"):
        return _parse_verify(tokens, exists=True)
    if tokens.accept("is no"):
        return _parse_verify(tokens, exists=False)
    if tokens.accept("is one"):
        return CountClaim(_parse_desc(tokens), 1)
    if tokens.accept("is both"):
        return _parse_both(tokens)
    if tokens.accept("is either"):
        _parse_article(tokens)
        first = _parse_desc(tokens)
        tokens.expect("or")
        _parse_article(tokens)
        return XorAttrClaim(first, _parse_desc(tokens))
    tokens.expect("are")
    if tokens.accept("as many"):
        first = _parse_desc(tokens, plural=True)
        tokens.expect("as")
        return CompareClaim(first, "as many", _parse_desc(tokens, plural=True))
    comparison = tokens.accept_one_of(("more", "fewer"))
    if comparison is not None:
        first = _parse_desc(tokens, plural=True)
        tokens.expect("than")
        return CompareClaim(first, comparison, _parse_desc(tokens, plural=True))
    number = tokens.accept_one_of(WORD_NUMBERS)
    if number is None:
        raise tokens.fail("a number, 'more', 'fewer' or 'as many'")
    return CountClaim(_parse_desc(tokens, plural=WORD_NUMBERS[number] != 1), WORD_NUMBERS[number])


def parse_caption(caption: str) -> Claim:
    """The claim a caption makes; raises ValueError naming the caption when it is not in the grammar.

    Case, surrounding whitespace and the final period do not matter (HNC's hand-typed test captions vary).
    """
    tokens = _Tokens(caption)
    if tokens.accept("the"):
        claim = _parse_definite_claim(tokens)
    elif tokens.accept("there"):
        claim = _parse_there_claim(tokens)
    else:
        raise tokens.fail("'the' or 'there'")
    if not tokens.at_end():
        raise tokens.fail("the end of the caption")
    return claim


def caption_is_true(caption: str, scene_graph_entry: dict) -> bool:
    """Whether a synthetic-world caption is true of a GQA-format scene-graph entry."""
    return parse_caption(caption).is_true(SceneGraphView(scene_graph_entry))
