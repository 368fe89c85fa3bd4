"""Small copies of the compositionality benchmarks, in their published formats, drawn in the synthetic world.

Written under the world's root (docs/data.md describes the real files):

- ``sugarcrepe/<category>.json`` for the seven SugarCrepe categories (RAIVNLab/sugar-crepe ``data/``): a JSON
  object ``{"0": {"filename", "caption", "negative_caption"}, ...}``; the images are COCO val2017 files,
  ``sugarcrepe/val2017/<12-digit COCO id>.jpg``.
- ``aro/visual_genome_relation.json`` and ``aro/visual_genome_attribution.json`` (ARO's VG-Relation and
  VG-Attribution, mertyg/vision-language-models-are-bows): lists of records whose ``image_path`` names
  ``aro/images/<VG id>.jpg``; the reader crops the image to ``bbox_x/y/w/h`` and prefers ``true_caption`` over
  ``false_caption``.
- ``aro/coco_karpathy_test.json`` and ``aro/flickr30k_test.json`` (BLIP's Karpathy test splits, which ARO's
  COCO-Order and Flickr30k-Order read): lists of ``{"image": <path below aro/>, "caption": [5 captions]}``, images
  ``aro/val2014/COCO_val2014_<12 digits>.jpg`` and ``aro/flickr30k-images/<Flickr id>.jpg``. The shuffled captions
  are made by the reader, as ARO does.
- ``winoground/data/examples.jsonl`` and ``winoground/data/images/<name>.png`` (facebook/winoground): two images,
  two captions with the same words in another order, each caption true of exactly one of the two images.
- ``vg/image_data.json`` (Visual Genome's image list): ``{"width", "url", "height", "image_id", "coco_id",
  "flickr_id"}`` for every HNC training image (GQA ids are VG ids) and every benchmark image that is a VG image.

Planted leakage. As in the real data, some benchmark images are GQA images, and so may be HNC training images:
a fixed number of VG-Relation and VG-Attribution items use an HNC training image (its VG id, its image file, its
scene graph), and a fixed number of SugarCrepe, COCO-Order and Flickr30k-Order images are HNC training images
under their COCO or Flickr name (``vg/image_data.json`` gives that VG image the COCO or Flickr id). A leakage
check that joins benchmark images to HNC training images by VG id, ``coco_id`` or ``flickr_id`` finds exactly
``counts["leakage_planted"]`` images per benchmark; every other benchmark image has a fresh id that no other part
of the world uses (VG ids below GQA's range, COCO ids above VQA's, Flickr ids of ten digits), and some of them have
a VG entry of their own, so that a check must compare ids and not merely find a VG entry.

Captions. Each caption is a noun-phrase sentence of the synthetic vocabulary that ``parse_benchmark_caption``
reads back: "A red circle to the left of a blue square.", "A large circle, a red square and a cross.", "the gray
diamond is above the square" (ARO), "a small circle and a large square" (Winoground). A true caption is true of
its image's scene graph and a negative (or swapped) one is false, by ``BenchmarkCaption.is_true``; ARO's
VG-Relation captions are also in the world's caption grammar (``hnclip.synth.caption_is_true`` reads them).

Every item draws from its own seeded stream, ``Random(f"{seed}/benchmarks/<benchmark>/<k>")``, and the choice of
planted images from ``Random(f"{seed}/benchmarks/leak")``: no other part of the world changes, and the files are
byte-identical for a given config and GQA training split.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ijson

from hnclip.synth.config import WorldConfig
from hnclip.synth.language import Desc, SceneGraphView
from hnclip.synth.negatives import true_triples
from hnclip.synth.render import render_scene, save_jpeg
from hnclip.synth.vocabulary import COLOUR_RGB, COLOURS, RELATIONS, SHAPES, SIZES
from hnclip.synth.world import (
    Scene,
    SceneObject,
    SceneSampler,
    _light_background,
    holds,
    jitter_colour,
    pair_is_unambiguous,
    scene_graph_entry,
)

# Sizes: small, so the whole set takes a few seconds and the demo's CPU evaluation stays cheap.
SUGARCREPE_CATEGORIES: tuple[str, ...] = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)
SUGARCREPE_PER_CATEGORY = 20
VG_RELATION_ITEMS = 60
VG_ATTRIBUTION_ITEMS = 60
ORDER_IMAGES = 8  # COCO-Order and Flickr30k-Order: 8 images x 5 captions = 40 captions each
ORDER_CAPTIONS_PER_IMAGE = 5
WINOGROUND_ITEMS = 24

# Planted overlap with the HNC training images (at most: fewer when the training split is smaller).
LEAK_SUGARCREPE_PER_CATEGORY = 1
LEAK_VG_RELATION = 10
LEAK_VG_ATTRIBUTION = 10
LEAK_COCO_ORDER = 2
LEAK_FLICKR_ORDER = 2
# Share of the other COCO/Flickr benchmark images that are VG images too (a fresh VG id, not an HNC image).
CLEAN_VG_ENTRY_RATE = 0.3

# Id ranges, disjoint from every other id of the world: GQA (VG) ids are 1,000,000-2,499,999; VQA's COCO ids
# are at most 999,999.
FRESH_VG_IDS = (100_000, 999_999)
FRESH_COCO_IDS = (1_000_000, 1_999_999)
FRESH_FLICKR_IDS = (1_000_000_000, 9_999_999_999)
VG_URL = "https://cs.stanford.edu/people/rak248/VG_100K/{}.jpg"  # the real list mixes VG_100K and VG_100K_2

MAX_SCENE_TRIES = 200

# Benchmark names, as in counts["leakage_planted"].
BENCHMARKS: tuple[str, ...] = (
    "sugarcrepe",
    "vg_relation",
    "vg_attribution",
    "coco_order",
    "flickr30k_order",
    "winoground",
)


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class BenchmarkCaption:
    """A noun-phrase caption: a list "a D, a D and a D", or a relation "a D [is] R a D".

    ``definite`` captions use "the" (each description must pick out exactly one object, all different);
    indefinite ones ask for distinct objects matching the descriptions (and standing in the relation).
    """

    descs: tuple[Desc, ...]
    relation: str | None = None
    definite: bool = False
    copula: bool = False

    def __post_init__(self) -> None:
        if not self.descs or (self.relation is not None and len(self.descs) != 2):
            raise ValueError(f"a relation caption takes two descriptions, got {self.descs!r}")

    def body(self) -> str:
        """The caption in lower case, without the final period."""
        phrases = [self._phrase(d) for d in self.descs]
        if self.relation is not None:
            verb = "is " if self.copula else ""
            return f"{phrases[0]} {verb}{self.relation} {phrases[1]}"
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def sentence(self) -> str:
        """COCO style: capital first letter and a period."""
        text = self.body()
        return text[0].upper() + text[1:] + "."

    def _phrase(self, desc: Desc) -> str:
        words = desc.words()
        return f"the {words}" if self.definite else f"{_article(words)} {words}"

    def is_true(self, view: SceneGraphView) -> bool:
        if self.definite:
            ids = [view.the(d) for d in self.descs]
            if None in ids or len(set(ids)) != len(ids):
                return False
            return self.relation is None or view.related(ids[0], self.relation, ids[1])
        if self.relation is not None:
            first, second = self.descs
            return any(
                x != y and view.related(x, self.relation, y) for x in view.matches(first) for y in view.matches(second)
            )
        return any(len(set(ids)) == len(ids) for ids in product(*(view.matches(d) for d in self.descs)))


def parse_benchmark_caption(text: str) -> BenchmarkCaption:
    """Read a caption of these benchmarks back (case, commas and the final period do not matter)."""
    words = text.strip().lower().rstrip(".").replace(",", " , ").split()
    pos = 0

    def fail(expected: str) -> ValueError:
        return ValueError(
            f"cannot parse caption {text!r}: expected {expected} at {' '.join(words[pos:]) or 'the end'!r}"
        )

    def phrase() -> tuple[bool, Desc]:
        nonlocal pos
        if pos >= len(words) or words[pos] not in ("a", "an", "the"):
            raise fail("'a', 'an' or 'the'")
        definite = words[pos] == "the"
        pos += 1
        size = colour = None
        if pos < len(words) and words[pos] in SIZES:
            size, pos = words[pos], pos + 1
        if pos < len(words) and words[pos] in COLOURS:
            colour, pos = words[pos], pos + 1
        if pos >= len(words) or words[pos] not in SHAPES:
            raise fail("a shape")
        pos += 1
        return definite, Desc(words[pos - 1], colour, size)

    def relation() -> str | None:
        nonlocal pos
        for name in RELATIONS:
            parts = name.split()
            if words[pos : pos + len(parts)] == parts:
                pos += len(parts)
                return name
        return None

    determiners, descs = [], []
    definite, desc = phrase()
    determiners.append(definite)
    descs.append(desc)
    copula = pos < len(words) and words[pos] == "is"
    pos += int(copula)
    found = relation() if pos < len(words) else None
    if found is None and copula:
        raise fail("a relation")
    if found is not None:
        definite, desc = phrase()
        determiners.append(definite)
        descs.append(desc)
    else:
        while pos < len(words):
            if words[pos] == ",":
                pos += 1
            elif words[pos] == "and":
                pos += 1
                definite, desc = phrase()
                determiners.append(definite)
                descs.append(desc)
                break
            else:
                raise fail("',' or 'and'")
            definite, desc = phrase()
            determiners.append(definite)
            descs.append(desc)
    if pos != len(words):
        raise fail("the end of the caption")
    if len(set(determiners)) != 1:
        raise fail("one kind of article throughout")
    return BenchmarkCaption(tuple(descs), found, determiners[0], copula)


def benchmark_caption_is_true(text: str, scene_graph: dict) -> bool:
    """Whether a caption of these benchmarks is true of a GQA-format scene-graph entry."""
    return parse_benchmark_caption(text).is_true(SceneGraphView(scene_graph))


# ---------------------------------------------------------------- scene queries


class _Facts:
    """One scene-graph entry, with the queries the caption builders ask."""

    def __init__(self, entry: dict) -> None:
        self.entry = entry
        self.view = SceneGraphView(entry)
        self.ids = list(entry["objects"])

    def shape(self, oid: str) -> str:
        return self.entry["objects"][oid]["name"]

    def colour(self, oid: str) -> str:
        return next(a for a in self.entry["objects"][oid]["attributes"] if a in COLOURS)

    def size(self, oid: str) -> str:
        return next(a for a in self.entry["objects"][oid]["attributes"] if a in SIZES)

    def full(self, oid: str, with_size: bool = False) -> Desc:
        return Desc(self.shape(oid), self.colour(oid), self.size(oid) if with_size else None)

    def bare(self, oid: str) -> Desc:
        return Desc(self.shape(oid))

    def unique(self, oid: str) -> Desc:
        """The shortest description that picks the object out (colour and shape always do)."""
        for desc in (Desc(self.shape(oid)), Desc(self.shape(oid), self.colour(oid))):
            if self.view.the(desc) == oid:
                return desc
        return Desc(self.shape(oid), self.colour(oid), self.size(oid))

    def triples(self) -> list[tuple[str, str, str]]:
        return true_triples(self.ids, self.view)

    def box(self, *oids: str) -> tuple[int, int, int, int]:
        """The union of the objects' boxes: x, y, w, h."""
        objects = [self.entry["objects"][o] for o in oids]
        x0, y0 = min(o["x"] for o in objects), min(o["y"] for o in objects)
        x1, y1 = max(o["x"] + o["w"] for o in objects), max(o["y"] + o["h"] for o in objects)
        return x0, y0, x1 - x0, y1 - y0


Pair = tuple[BenchmarkCaption, BenchmarkCaption]


def _distinct(caption: BenchmarkCaption) -> bool:
    """No description twice ("a red circle and a red circle" reads as a slip, not as a claim)."""
    return len(set(caption.descs)) == len(caption.descs)


def _first_false(facts: _Facts, positive: BenchmarkCaption, edits: Iterable[BenchmarkCaption]) -> Pair | None:
    """The positive with the first edit that is false of the scene (None when the positive is not true)."""
    if not _distinct(positive) or not positive.is_true(facts.view):
        return None
    for negative in edits:
        if negative.body() != positive.body() and _distinct(negative) and not negative.is_true(facts.view):
            return positive, negative
    return None


def _shuffled(rng: random.Random, values: Iterable) -> list:
    values = list(values)
    rng.shuffle(values)
    return values


def _with_desc(caption: BenchmarkCaption, index: int, desc: Desc) -> BenchmarkCaption:
    descs = list(caption.descs)
    descs[index] = desc
    return replace(caption, descs=tuple(descs))


def _positive(facts: _Facts, rng: random.Random, describe: Callable[[str], Desc], form: str) -> BenchmarkCaption:
    """A true caption of the scene: a relation between two objects, or a list of objects ("list": two or three,
    as a scene allows; "1", "2": that many)."""
    if form == "relation":
        # Never empty: the layout rules keep every two objects apart on some axis.
        a, relation, b = rng.choice(facts.triples())
        return BenchmarkCaption((describe(a), describe(b)), relation, copula=rng.random() < 0.3)
    count = rng.randint(2, min(3, len(facts.ids))) if form == "list" else int(form)
    return BenchmarkCaption(tuple(describe(o) for o in rng.sample(facts.ids, count)))


# ---------------------------------------------------------------- SugarCrepe


def _replace_obj(facts: _Facts, rng: random.Random) -> Pair | None:
    positive = _positive(facts, rng, lambda o: facts.full(o, rng.random() < 0.2), rng.choice(("relation", "list")))
    edits = (
        _with_desc(positive, i, replace(positive.descs[i], noun=shape))
        for i in _shuffled(rng, range(len(positive.descs)))
        for shape in _shuffled(rng, SHAPES)
    )
    return _first_false(facts, positive, edits)


def _replace_att(facts: _Facts, rng: random.Random) -> Pair | None:
    positive = _positive(facts, rng, lambda o: facts.full(o, rng.random() < 0.25), rng.choice(("relation", "list")))

    def edits() -> Iterable[BenchmarkCaption]:
        for i in _shuffled(rng, range(len(positive.descs))):
            desc = positive.descs[i]
            options = [replace(desc, colour=c) for c in COLOURS if c != desc.colour]
            if desc.size is not None:
                options += [replace(desc, size=s) for s in SIZES if s != desc.size]
            for option in _shuffled(rng, options):
                yield _with_desc(positive, i, option)

    return _first_false(facts, positive, edits())


def _replace_rel(facts: _Facts, rng: random.Random) -> Pair | None:
    positive = _positive(facts, rng, lambda o: facts.full(o, rng.random() < 0.2), "relation")
    edits = (replace(positive, relation=r) for r in _shuffled(rng, RELATIONS) if r != positive.relation)
    return _first_false(facts, positive, edits)


def _swap_obj(facts: _Facts, rng: random.Random) -> Pair | None:
    # The nouns trade places ("A circle above a square." / "A square above a circle."): bare nouns, so the edit
    # is the objects' order and nothing else.
    positive = _positive(facts, rng, facts.bare, "relation")
    first, second = positive.descs
    if first.noun == second.noun:
        return None
    return _first_false(facts, positive, [replace(positive, descs=(second, first))])


def _swap_att(facts: _Facts, rng: random.Random) -> Pair | None:
    positive = _positive(facts, rng, facts.full, rng.choice(("relation", "2")))
    first, second = positive.descs
    if first.noun == second.noun or first.colour == second.colour:
        return None
    swapped = (replace(first, colour=second.colour), replace(second, colour=first.colour))
    return _first_false(facts, positive, [replace(positive, descs=swapped)])


def _add_obj(facts: _Facts, rng: random.Random) -> Pair | None:
    positive = _positive(facts, rng, facts.full, rng.choice(("1", "2")))
    extra = (Desc(shape, colour) for colour, shape in _shuffled(rng, product(COLOURS, SHAPES)))
    return _first_false(facts, positive, (replace(positive, descs=(*positive.descs, d)) for d in extra))


def _add_att(facts: _Facts, rng: random.Random) -> Pair | None:
    form = rng.choice(("relation", "2"))
    bare_index = rng.randrange(2)
    positive = _positive(facts, rng, facts.full, form)
    positive = _with_desc(positive, bare_index, Desc(positive.descs[bare_index].noun))
    target = positive.descs[bare_index]
    options = [replace(target, colour=c) for c in COLOURS] + [replace(target, size=s) for s in SIZES]
    weighted = _shuffled(rng, options[: len(COLOURS)]) + _shuffled(rng, options[len(COLOURS) :])
    return _first_false(facts, positive, (_with_desc(positive, bare_index, d) for d in weighted))


SUGARCREPE_BUILDERS: dict[str, Callable[[_Facts, random.Random], Pair | None]] = {
    "replace_obj": _replace_obj,
    "replace_att": _replace_att,
    "replace_rel": _replace_rel,
    "swap_obj": _swap_obj,
    "swap_att": _swap_att,
    "add_obj": _add_obj,
    "add_att": _add_att,
}


# ---------------------------------------------------------------- ARO


def _vg_relation(facts: _Facts, rng: random.Random) -> dict | None:
    """ "the X is R the Y" / "the Y is R the X", with the shortest descriptions that pick the objects out."""
    a, relation, b = rng.choice(facts.triples())
    true = BenchmarkCaption((facts.unique(a), facts.unique(b)), relation, definite=True, copula=True)
    pair = _first_false(facts, true, [replace(true, descs=true.descs[::-1])])
    if pair is None:
        return None
    return {
        "relation_name": relation,
        "box": facts.box(a, b),
        "true_caption": pair[0].body(),
        "false_caption": pair[1].body(),
        "names": (facts.shape(a), facts.shape(b)),
    }


def _vg_attribution(facts: _Facts, rng: random.Random) -> dict | None:
    """ "the red circle and the blue square" / "the blue circle and the red square" (colour, sometimes size)."""
    if len(facts.ids) < 2:
        return None
    a, b = rng.sample(facts.ids, 2)
    if facts.shape(a) == facts.shape(b):
        return None
    kind = "size" if rng.random() < 0.2 and facts.size(a) != facts.size(b) else "colour"
    attrs = (facts.size(a), facts.size(b)) if kind == "size" else (facts.colour(a), facts.colour(b))
    if attrs[0] == attrs[1]:
        return None

    def desc(oid: str, attribute: str) -> Desc:
        return Desc(facts.shape(oid), size=attribute) if kind == "size" else Desc(facts.shape(oid), attribute)

    true = BenchmarkCaption((desc(a, attrs[0]), desc(b, attrs[1])), definite=True)
    false = BenchmarkCaption((desc(a, attrs[1]), desc(b, attrs[0])), definite=True)
    pair = _first_false(facts, true, [false])
    if pair is None:
        return None
    return {
        "attributes": list(attrs),
        "box": facts.box(a, b),
        "true_caption": pair[0].body(),
        "false_caption": pair[1].body(),
        "names": (facts.shape(a), facts.shape(b)),
    }


def _order_captions(facts: _Facts, rng: random.Random) -> list[str] | None:
    """Five different true COCO-style captions of the scene (relations and lists, more or less detailed)."""
    describers: tuple[Callable[[str], Desc], ...] = (
        facts.bare,
        facts.full,
        lambda o: facts.full(o, with_size=True),
        lambda o: Desc(facts.shape(o), size=facts.size(o)),
    )
    captions: list[str] = []
    for _ in range(100):
        describe = rng.choice(describers)
        caption = _positive(facts, rng, describe, "relation" if rng.random() < 0.6 else "list")
        if _distinct(caption) and caption.is_true(facts.view) and caption.sentence() not in captions:
            captions.append(caption.sentence())
            if len(captions) == ORDER_CAPTIONS_PER_IMAGE:
                return captions
    return None


# ---------------------------------------------------------------- Winoground


@dataclass(frozen=True)
class _Box:
    x: int
    y: int
    w: int
    h: int


WINOGROUND_KINDS: tuple[tuple[str, str, str], ...] = (
    # (kind, tag, collapsed_tag) in Winoground's tag vocabulary
    ("object", "Noun", "Object"),
    ("colour", "Adjective-Color", "Relation"),
    ("size", "Adjective-Size", "Relation"),
)


def _two_object_scene(
    sampler: SceneSampler,
    rng: random.Random,
    specs: Sequence[tuple[str, str, str]],
    required: str | None,
) -> Scene:
    """Two objects (colour, shape, size), laid out by the world's rules; ``required`` must hold of first, second."""
    rules = sampler.rules
    for _ in range(MAX_SCENE_TRIES):
        boxes = []
        for _colour, _shape, size in specs:
            side = rng.randint(*(rules.large_side if size == "large" else rules.small_side))
            high = rules.image_size - rules.border - side
            boxes.append(_Box(rng.randint(rules.border, high), rng.randint(rules.border, high), side, side))
        if not pair_is_unambiguous(boxes[0], boxes[1], rules.gap, sampler.config.diagonal_pairs):
            continue
        if required is not None and not holds(boxes[0], required, boxes[1], rules.gap):
            continue
        background = _light_background(rng)
        objects = tuple(
            SceneObject(str(k), shape, colour, size, box.x, box.y, box.w, box.h, jitter_colour(rng, COLOUR_RGB[colour]))
            for k, ((colour, shape, size), box) in enumerate(zip(specs, boxes))
        )
        return Scene(rules.image_size, rules.image_size, background, objects)
    raise RuntimeError(f"could not lay out a two-object scene in {MAX_SCENE_TRIES} tries")


@dataclass
class _WinogroundItem:
    captions: tuple[BenchmarkCaption, BenchmarkCaption]
    scenes: tuple[Scene, Scene]
    tag: str
    collapsed_tag: str


def _winoground_item(sampler: SceneSampler, rng: random.Random, kind: str) -> _WinogroundItem:
    tag, collapsed = next((t, c) for k, t, c in WINOGROUND_KINDS if k == kind)
    shape_a, shape_b = rng.sample(SHAPES, 2)
    colour_a, colour_b = rng.sample(COLOURS, 2)
    size_a, size_b = rng.choice(SIZES), rng.choice(SIZES)
    if kind == "object":
        relation = rng.choice(RELATIONS)
        detail = rng.random() < 0.5
        first = Desc(shape_a, colour_a if detail else None)
        second = Desc(shape_b, colour_b if detail else None)
        captions = (
            BenchmarkCaption((first, second), relation, copula=True),
            BenchmarkCaption((second, first), relation, copula=True),
        )
        specs = [(colour_a, shape_a, size_a), (colour_b, shape_b, size_b)]
        scenes = (
            _two_object_scene(sampler, rng, specs, relation),
            _two_object_scene(sampler, rng, specs[::-1], relation),
        )
    elif kind == "colour":
        captions = (
            BenchmarkCaption((Desc(shape_a, colour_a), Desc(shape_b, colour_b))),
            BenchmarkCaption((Desc(shape_a, colour_b), Desc(shape_b, colour_a))),
        )
        scenes = (
            _two_object_scene(sampler, rng, [(colour_a, shape_a, size_a), (colour_b, shape_b, size_b)], None),
            _two_object_scene(sampler, rng, [(colour_b, shape_a, size_a), (colour_a, shape_b, size_b)], None),
        )
    else:
        small, large = ("small", "large")
        captions = (
            BenchmarkCaption((Desc(shape_a, size=small), Desc(shape_b, size=large))),
            BenchmarkCaption((Desc(shape_a, size=large), Desc(shape_b, size=small))),
        )
        scenes = (
            _two_object_scene(sampler, rng, [(colour_a, shape_a, small), (colour_b, shape_b, large)], None),
            _two_object_scene(sampler, rng, [(colour_a, shape_a, large), (colour_b, shape_b, small)], None),
        )
    return _WinogroundItem(captions, scenes, tag, collapsed)


# ---------------------------------------------------------------- the plan


@dataclass
class BenchmarkImage:
    """One image file: drawn from ``scene``, or copied from ``source`` (a GQA training image)."""

    path: str  # relative to the world root
    scene_graph: dict  # GQA format
    scene: Scene | None = None
    source: Path | None = None
    image_format: str = "JPEG"


@dataclass
class CompositionalPlan:
    """Everything ``write_compositional_benchmarks`` writes, before it is written."""

    files: dict[str, str] = field(default_factory=dict)  # relative path -> text
    images: dict[str, BenchmarkImage] = field(default_factory=dict)  # relative path -> image
    counts: dict = field(default_factory=dict)

    @property
    def scene_graphs(self) -> dict[str, dict]:
        return {path: image.scene_graph for path, image in self.images.items()}

    def add_image(self, image: BenchmarkImage) -> None:
        if image.path in self.images:
            raise RuntimeError(f"benchmark image {image.path} planned twice")
        self.images[image.path] = image


def _rng(config: WorldConfig, *path: object) -> random.Random:
    # The same stream naming as hnclip.synth.build._item_rng, under "benchmarks/".
    return random.Random("/".join(str(p) for p in (config.seed, "benchmarks", *path)))


class _Ids:
    """Fresh ids of one id space, each drawn from its item's own stream; never two alike."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high, self.used = low, high, set()

    def draw(self, rng: random.Random) -> int:
        while True:
            value = rng.randint(self.low, self.high)
            if value not in self.used:
                self.used.add(value)
                return value


@dataclass
class _Leak:
    """HNC training images to plant, drawn in a fixed order; each is used once."""

    root: Path
    candidates: list[str]
    graphs: dict[str, dict]
    position: int = 0

    def take(self, build: Callable[[_Facts], object | None]) -> tuple[str, object] | None:
        """The next training image whose scene ``build`` can caption, with what it built; None when none is left."""
        while self.position < len(self.candidates):
            image_id = self.candidates[self.position]
            self.position += 1
            built = build(_Facts(self.graphs[image_id]))
            if built is not None:
                return image_id, built
        return None

    def image(self, image_id: str) -> Path:
        return self.root / "gqa" / "images" / f"{image_id}.jpg"


def _load_leak(root: Path, config: WorldConfig, hnc_train_image_ids: Sequence[str], wanted: int) -> _Leak:
    ids = [str(i) for i in hnc_train_image_ids]
    rng = random.Random(f"{config.seed}/benchmarks/leak")
    # Four candidates per planted image: a scene that cannot carry a caption kind is passed over.
    candidates = rng.sample(ids, min(len(ids), 4 * wanted + 8))
    graphs: dict[str, dict] = {}
    if candidates:
        path = root / "gqa" / "train_sceneGraphs.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the GQA training split must be written before the benchmarks")
        wanted_ids = set(candidates)
        with open(path, "rb") as handle:
            for key, value in ijson.kvitems(handle, "", use_float=True):
                if key in wanted_ids:
                    graphs[key] = value
                    if len(graphs) == len(wanted_ids):
                        break
        missing = sorted(wanted_ids - set(graphs))
        if missing:
            raise KeyError(f"HNC training image(s) {missing[:5]} have no scene graph in {path}")
    return _Leak(root, candidates, graphs)


def _fresh_scene(sampler: SceneSampler, rng: random.Random) -> tuple[Scene, _Facts]:
    scene = sampler.sample(rng, [str(k) for k in range(4)], "natural")
    return scene, _Facts(scene_graph_entry(scene, sampler.rules))


def _fresh(sampler: SceneSampler, rng: random.Random, build: Callable[[_Facts], object | None], what: str):
    for _ in range(MAX_SCENE_TRIES):
        scene, facts = _fresh_scene(sampler, rng)
        built = build(facts)
        if built is not None:
            return scene, facts, built
    raise RuntimeError(f"no scene in {MAX_SCENE_TRIES} draws could carry a {what} item")


@dataclass
class _Context:
    root: Path
    config: WorldConfig
    sampler: SceneSampler
    leak: _Leak
    plan: CompositionalPlan
    vg_ids: _Ids = field(default_factory=lambda: _Ids(*FRESH_VG_IDS))
    coco_ids: _Ids = field(default_factory=lambda: _Ids(*FRESH_COCO_IDS))
    flickr_ids: _Ids = field(default_factory=lambda: _Ids(*FRESH_FLICKR_IDS))
    # VG entries of benchmark images: vg id -> {"coco_id", "flickr_id"}
    vg_entries: dict[int, dict] = field(default_factory=dict)
    planted: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in BENCHMARKS})

    def item(
        self, rng: random.Random, plant: bool, build: Callable[[_Facts], object | None], what: str
    ) -> tuple[str | None, Scene | None, _Facts, object]:
        """(planted HNC image id or None, scene to draw or None, scene facts, what ``build`` made)."""
        if plant:
            taken = self.leak.take(build)
            if taken is not None:
                image_id, built = taken
                return image_id, None, _Facts(self.leak.graphs[image_id]), built
        scene, facts, built = _fresh(self.sampler, rng, build, what)
        return None, scene, facts, built

    def add_image(self, path: str, facts: _Facts, scene: Scene | None, planted_id: str | None, fmt: str = "JPEG"):
        source = self.leak.image(planted_id) if planted_id is not None else None
        if source is not None and not source.is_file():
            raise FileNotFoundError(f"{source}: HNC training image missing (write the GQA images first)")
        self.plan.add_image(BenchmarkImage(path, facts.entry, scene, source, fmt))


def _plant_slots(config: WorldConfig, name: str, n_items: int, n_planted: int) -> set[int]:
    return set(random.Random(f"{config.seed}/benchmarks/leak/{name}").sample(range(n_items), min(n_items, n_planted)))


def _coco_or_flickr_vg_entry(
    ctx: _Context, rng: random.Random, benchmark: str, planted_id: str | None, key: str, value: int
) -> None:
    """Make the image a VG image: the planted HNC image itself, or now and then a fresh VG image."""
    if planted_id is not None:
        ctx.vg_entries[int(planted_id)] = {key: value}
        ctx.planted[benchmark].append(planted_id)
    elif rng.random() < CLEAN_VG_ENTRY_RATE:
        ctx.vg_entries[ctx.vg_ids.draw(rng)] = {key: value}


def _plan_sugarcrepe(ctx: _Context) -> dict:
    counts: dict = {}
    for category in SUGARCREPE_CATEGORIES:
        builder = SUGARCREPE_BUILDERS[category]
        slots = _plant_slots(
            ctx.config, f"sugarcrepe/{category}", SUGARCREPE_PER_CATEGORY, LEAK_SUGARCREPE_PER_CATEGORY
        )
        records: dict[str, dict] = {}
        for k in range(SUGARCREPE_PER_CATEGORY):
            rng = _rng(ctx.config, "sugarcrepe", category, k)
            planted_id, scene, facts, pair = ctx.item(rng, k in slots, lambda f: builder(f, rng), category)
            coco_id = ctx.coco_ids.draw(rng)
            filename = f"{coco_id:012d}.jpg"
            ctx.add_image(f"sugarcrepe/val2017/{filename}", facts, scene, planted_id)
            _coco_or_flickr_vg_entry(ctx, rng, "sugarcrepe", planted_id, "coco_id", coco_id)
            positive, negative = pair  # type: ignore[misc]
            records[str(k)] = {
                "filename": filename,
                "caption": positive.sentence(),
                "negative_caption": negative.sentence(),
            }
        ctx.plan.files[f"sugarcrepe/{category}.json"] = json.dumps(records, indent=4)
        counts[category] = len(records)
    counts["images"] = sum(counts.values())
    return counts


def _plan_vg(ctx: _Context, benchmark: str, n_items: int, n_planted: int, build, filename: str) -> int:
    slots = _plant_slots(ctx.config, benchmark, n_items, n_planted)
    records = []
    for k in range(n_items):
        rng = _rng(ctx.config, benchmark, k)
        planted_id, scene, facts, made = ctx.item(rng, k in slots, lambda f: build(f, rng), benchmark)
        if planted_id is not None:
            vg_id = int(planted_id)
            ctx.planted[benchmark].append(planted_id)
        else:
            vg_id = ctx.vg_ids.draw(rng)
        ctx.vg_entries.setdefault(vg_id, {})
        ctx.add_image(f"aro/images/{vg_id}.jpg", facts, scene, planted_id)
        x, y, w, h = made["box"]
        record = {"image_id": str(vg_id)}
        if benchmark == "vg_relation":
            record["relation_name"] = made["relation_name"]
        else:
            record["attributes"] = made["attributes"]
        record.update(
            {
                "obj1_name": made["names"][0],
                "obj2_name": made["names"][1],
                "image_path": f"{vg_id}.jpg",
                "bbox_x": x,
                "bbox_y": y,
                "bbox_w": w,
                "bbox_h": h,
                "true_caption": made["true_caption"],
                "false_caption": made["false_caption"],
            }
        )
        records.append(record)
    ctx.plan.files[f"aro/{filename}"] = json.dumps(records)
    return len(records)


def _plan_order(ctx: _Context, benchmark: str, n_planted: int) -> dict:
    slots = _plant_slots(ctx.config, benchmark, ORDER_IMAGES, n_planted)
    records = []
    for k in range(ORDER_IMAGES):
        rng = _rng(ctx.config, benchmark, k)
        planted_id, scene, facts, captions = ctx.item(rng, k in slots, lambda f: _order_captions(f, rng), benchmark)
        if benchmark == "coco_order":
            image_number = ctx.coco_ids.draw(rng)
            image = f"val2014/COCO_val2014_{image_number:012d}.jpg"
            key = "coco_id"
        else:
            image_number = ctx.flickr_ids.draw(rng)
            image = f"flickr30k-images/{image_number}.jpg"
            key = "flickr_id"
        ctx.add_image(f"aro/{image}", facts, scene, planted_id)
        _coco_or_flickr_vg_entry(ctx, rng, benchmark, planted_id, key, image_number)
        records.append({"image": image, "caption": captions})
    name = "coco_karpathy_test.json" if benchmark == "coco_order" else "flickr30k_test.json"
    ctx.plan.files[f"aro/{name}"] = json.dumps(records)
    return {"images": len(records), "captions": sum(len(r["caption"]) for r in records)}


def _plan_winoground(ctx: _Context) -> dict:
    lines, by_tag = [], {}
    for k in range(WINOGROUND_ITEMS):
        rng = _rng(ctx.config, "winoground", k)
        kind = WINOGROUND_KINDS[k % len(WINOGROUND_KINDS)][0]
        item = _winoground_item(ctx.sampler, rng, kind)
        names = (f"ex_{k}_img_0", f"ex_{k}_img_1")
        for name, scene in zip(names, item.scenes):
            facts = _Facts(scene_graph_entry(scene, ctx.sampler.rules))
            ctx.add_image(f"winoground/data/images/{name}.png", facts, scene, None, "PNG")
        record = {
            "id": k,
            "image_0": names[0],
            "image_1": names[1],
            "caption_0": item.captions[0].body(),
            "caption_1": item.captions[1].body(),
            "tag": item.tag,
            "secondary_tag": "",
            "num_main_preds": 1,
            "collapsed_tag": item.collapsed_tag,
        }
        lines.append(json.dumps(record))
        by_tag[item.collapsed_tag] = by_tag.get(item.collapsed_tag, 0) + 1
    ctx.plan.files["winoground/data/examples.jsonl"] = "".join(line + "\n" for line in lines)
    return {"examples": len(lines), "images": 2 * len(lines), "by_collapsed_tag": dict(sorted(by_tag.items()))}


def _plan_vg_image_data(ctx: _Context, hnc_train_image_ids: Sequence[str]) -> dict:
    size = ctx.config.image_size
    entries: dict[int, dict] = {int(i): {} for i in hnc_train_image_ids}
    for vg_id, ids in ctx.vg_entries.items():
        entries.setdefault(vg_id, {}).update(ids)
    records = [
        {
            "width": size,
            "url": VG_URL.format(vg_id),
            "height": size,
            "image_id": vg_id,
            "coco_id": entries[vg_id].get("coco_id"),
            "flickr_id": entries[vg_id].get("flickr_id"),
        }
        for vg_id in sorted(entries)
    ]
    ctx.plan.files["vg/image_data.json"] = json.dumps(records)
    return {
        "images": len(records),
        "with_coco_id": sum(r["coco_id"] is not None for r in records),
        "with_flickr_id": sum(r["flickr_id"] is not None for r in records),
    }


def plan_compositional_benchmarks(
    root: Path, config: WorldConfig, sampler: SceneSampler, hnc_train_image_ids: Sequence[str]
) -> CompositionalPlan:
    """What ``write_compositional_benchmarks`` writes, with the scene graph of every image (nothing is written).

    Reads the planted HNC training images' scene graphs from ``root/gqa/train_sceneGraphs.json``.
    """
    root = Path(root)
    wanted = (
        LEAK_SUGARCREPE_PER_CATEGORY * len(SUGARCREPE_CATEGORIES)
        + LEAK_VG_RELATION
        + LEAK_VG_ATTRIBUTION
        + LEAK_COCO_ORDER
        + LEAK_FLICKR_ORDER
    )
    leak = _load_leak(root, config, hnc_train_image_ids, wanted)
    ctx = _Context(root, config, sampler, leak, CompositionalPlan())
    counts: dict = {}
    counts["sugarcrepe"] = _plan_sugarcrepe(ctx)
    counts["vg_relation"] = {
        "items": _plan_vg(
            ctx, "vg_relation", VG_RELATION_ITEMS, LEAK_VG_RELATION, _vg_relation, "visual_genome_relation.json"
        )
    }
    counts["vg_attribution"] = {
        "items": _plan_vg(
            ctx,
            "vg_attribution",
            VG_ATTRIBUTION_ITEMS,
            LEAK_VG_ATTRIBUTION,
            _vg_attribution,
            "visual_genome_attribution.json",
        )
    }
    counts["coco_order"] = _plan_order(ctx, "coco_order", LEAK_COCO_ORDER)
    counts["flickr30k_order"] = _plan_order(ctx, "flickr30k_order", LEAK_FLICKR_ORDER)
    counts["winoground"] = _plan_winoground(ctx)
    counts["vg_image_data"] = _plan_vg_image_data(ctx, hnc_train_image_ids)
    counts["leakage_planted"] = {name: len(ids) for name, ids in ctx.planted.items()}
    counts["leakage_planted_vg_ids"] = {name: sorted(ids, key=int) for name, ids in ctx.planted.items()}
    ctx.plan.counts = counts
    return ctx.plan


def write_compositional_benchmarks(
    root: Path, config: WorldConfig, sampler: SceneSampler, hnc_train_image_ids: Sequence[str]
) -> dict:
    """Write the benchmarks under ``root`` (after the GQA training split) and return their counts for world.json.

    ``counts["leakage_planted"]``: per benchmark, how many of its images are HNC training images (joined by VG id,
    or through ``vg/image_data.json``'s ``coco_id`` / ``flickr_id``); ``counts["leakage_planted_vg_ids"]``: which.
    """
    root = Path(root)
    plan = plan_compositional_benchmarks(root, config, sampler, hnc_train_image_ids)
    for relative, text in plan.files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for relative, image in plan.images.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if image.source is not None:
            shutil.copyfile(image.source, path)
        elif image.image_format == "PNG":
            render_scene(image.scene).save(path, format="PNG")
        else:
            save_jpeg(render_scene(image.scene), path, config.jpeg_quality)
    return plan.counts
