"""Scenes of the synthetic world: coloured shapes placed so every spatial relation is unambiguous.

A scene is a few objects (shape, colour, size, box). Layout rules, in pixels of the written image:
- every object keeps ``border`` pixels from the image edge;
- two objects never overlap: their boxes are at least ``gap`` apart along some axis;
- along each axis, two boxes are either clearly apart (gap >= ``gap``: a left/right or above/below relation) or
  clearly aligned (their projections overlap by at least half the smaller box), never in between.
So "the circle is to the left of the square" is either plainly true or plainly false when looking at the pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import combinations, permutations
from typing import Literal, Sequence

from hnclip.synth.config import WorldConfig
from hnclip.synth.vocabulary import (
    CANONICAL_RELATIONS,
    COLOUR_RGB,
    COLOURS,
    GLYPHS,
    OPPOSITE,
    RELATIONS,
    SHAPES,
    SIZES,
)

HeldOutMode = Literal["exclude", "natural", "force"]


@dataclass(frozen=True)
class SceneObject:
    object_id: str
    shape: str
    colour: str
    size: str
    x: int
    y: int
    w: int
    h: int
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class LayoutRules:
    """Pixel constants of the layout, derived from the image size."""

    image_size: int
    border: int
    gap: int
    small_side: tuple[int, int]
    large_side: tuple[int, int]

    @classmethod
    def for_size(cls, image_size: int, min_gap: float = 0.07) -> "LayoutRules":
        # Small shapes stay >= 6 px and the gap >= 2 px once the demo tower resizes 64 px images to 32 px.
        return cls(
            image_size=image_size,
            border=max(1, round(0.03 * image_size)),
            gap=max(2, round(min_gap * image_size)),
            small_side=(round(0.21 * image_size), round(0.25 * image_size)),
            large_side=(round(0.33 * image_size), round(0.38 * image_size)),
        )


@dataclass(frozen=True)
class HeldOut:
    """Combinations that appear only in test splits.

    ``relation`` holds canonical triples (shape, "to the left of" | "above", shape): holding out "triangle to the
    left of circle" also holds out "circle to the right of triangle", the same fact.
    """

    colour_shape: tuple[tuple[str, str], ...] = ()
    relation: tuple[tuple[str, str, str], ...] = ()
    textvqa_words: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list]:
        return {
            "colour_shape": [list(p) for p in self.colour_shape],
            "relation": [list(t) for t in self.relation],
            "textvqa_words": list(self.textvqa_words),
        }


@dataclass
class SceneFacts:
    """Which held-out combinations a scene shows."""

    colour_shape: set[tuple[str, str]] = field(default_factory=set)
    relation: set[tuple[str, str, str]] = field(default_factory=set)

    def any(self) -> bool:
        return bool(self.colour_shape or self.relation)


def axis_gap(start_a: int, extent_a: int, start_b: int, extent_b: int) -> int:
    """Pixels between two intervals; negative values are the overlap."""
    return max(start_b - (start_a + extent_a), start_a - (start_b + extent_b))


def holds(a: SceneObject, relation: str, b: SceneObject, gap: int) -> bool:
    """Whether ``a <relation> b`` holds by the boxes (image y grows downwards)."""
    if relation == "to the left of":
        return b.x - (a.x + a.w) >= gap
    if relation == "to the right of":
        return a.x - (b.x + b.w) >= gap
    if relation == "above":
        return b.y - (a.y + a.h) >= gap
    if relation == "below":
        return a.y - (b.y + b.h) >= gap
    raise ValueError(f"unknown relation {relation!r}")


def pair_is_unambiguous(a: SceneObject, b: SceneObject, gap: int, diagonal: bool = True) -> bool:
    """Apart on some axis (on exactly one unless ``diagonal``), and on each axis clearly apart or clearly aligned."""
    gap_x = axis_gap(a.x, a.w, b.x, b.w)
    gap_y = axis_gap(a.y, a.h, b.y, b.h)
    aligned_x = -gap_x >= math.ceil(min(a.w, b.w) / 2)
    aligned_y = -gap_y >= math.ceil(min(a.h, b.h) / 2)
    if not diagonal and gap_x >= gap and gap_y >= gap:
        return False
    return (gap_x >= gap or gap_y >= gap) and (gap_x >= gap or aligned_x) and (gap_y >= gap or aligned_y)


def canonical_triple(shape_a: str, relation: str, shape_b: str) -> tuple[str, str, str]:
    """State a relation between shapes as (left/upper shape, "to the left of"/"above", other shape)."""
    if relation in CANONICAL_RELATIONS:
        return (shape_a, relation, shape_b)
    return (shape_b, OPPOSITE[relation], shape_a)


def scene_facts(scene: Scene, rules: LayoutRules) -> SceneFacts:
    """All colour-shape pairs and canonical shape-relation-shape triples the scene shows."""
    facts = SceneFacts()
    for obj in scene.objects:
        facts.colour_shape.add((obj.colour, obj.shape))
    for a, b in permutations(scene.objects, 2):
        for relation in CANONICAL_RELATIONS:
            if holds(a, relation, b, rules.gap):
                facts.relation.add((a.shape, relation, b.shape))
    return facts


def heldout_facts(scene: Scene, rules: LayoutRules, heldout: HeldOut) -> SceneFacts:
    facts = scene_facts(scene, rules)
    return SceneFacts(
        colour_shape=facts.colour_shape & set(heldout.colour_shape),
        relation=facts.relation & set(heldout.relation),
    )


def choose_heldout(config: WorldConfig) -> HeldOut:
    """Pick the held-out combinations from the seed (distinct shape pairs for the relation triples)."""
    rng = random.Random(f"{config.seed}/heldout")
    colour_shape = tuple(sorted(_spread_pairs(rng, config.heldout_colour_shape_pairs)))
    shape_pairs = [(a, b) for a in SHAPES for b in SHAPES if a < b]
    chosen = rng.sample(shape_pairs, config.heldout_relation_triples)
    triples = []
    for a, b in chosen:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        triples.append((first, rng.choice(CANONICAL_RELATIONS), second))
    words: set[str] = set()
    while len(words) < config.heldout_textvqa_words:
        words.add(rng.choice(GLYPHS) + rng.choice(GLYPHS))
    return HeldOut(colour_shape=colour_shape, relation=tuple(sorted(triples)), textvqa_words=tuple(sorted(words)))


def _spread_pairs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Colour-shape pairs with no colour or shape repeated, so each held-out pair leaves its parts well seen."""
    colours, shapes = rng.sample(COLOURS, len(COLOURS)), rng.sample(SHAPES, len(SHAPES))
    return [(colours[k % len(colours)], shapes[k % len(shapes)]) for k in range(count)]


def scene_graph_entry(scene: Scene, rules: LayoutRules) -> dict:
    """The scene in GQA's scene-graph format (relations as a list, boxes as top-left x, y, w, h)."""
    objects = {}
    for obj in scene.objects:
        relations = [
            {"name": relation, "object": other.object_id}
            for other in scene.objects
            if other is not obj
            for relation in RELATIONS
            if holds(obj, relation, other, rules.gap)
        ]
        objects[obj.object_id] = {
            "name": obj.shape,
            "x": obj.x,
            "y": obj.y,
            "w": obj.w,
            "h": obj.h,
            "attributes": [obj.colour, obj.size],
            "relations": relations,
        }
    return {"width": scene.width, "height": scene.height, "objects": objects}


class SceneSampler:
    """Draws scenes that obey the layout rules and the held-out policy of their split.

    ``mode``: "exclude" (train/val: no held-out pair or triple anywhere), "natural" (test splits: held-out
    combinations may occur by chance), "force" (test splits: the scene is built around one held-out combination).
    """

    MAX_PLACEMENT_TRIES = 60
    MAX_COMPOSITION_TRIES = 40

    def __init__(self, config: WorldConfig, heldout: HeldOut) -> None:
        self.config = config
        self.rules = LayoutRules.for_size(config.image_size, config.min_gap)
        self.heldout = heldout
        self._heldout_pairs = set(heldout.colour_shape)
        self._heldout_triples = set(heldout.relation)
        self._all_combos = [(c, s) for c in COLOURS for s in SHAPES]
        self._allowed_combos = [p for p in self._all_combos if p not in self._heldout_pairs]

    def sample(self, rng: random.Random, object_ids: Sequence[str], mode: HeldOutMode) -> Scene:
        """A scene whose objects take their ids, in order, from ``object_ids``."""
        if mode == "force" and not (self.heldout.colour_shape or self.heldout.relation):
            mode = "natural"
        for _ in range(self.MAX_COMPOSITION_TRIES):
            combos, required = self._compose(rng, mode)
            sizes = [rng.choice(SIZES) for _ in combos]
            placed = self._place(rng, combos, sizes, required, mode)
            if placed is not None:
                return self._build_scene(rng, combos, placed, object_ids)
        raise RuntimeError(
            f"could not lay out a scene in {self.MAX_COMPOSITION_TRIES} tries "
            f"(image_size={self.config.image_size}, max_objects={self.config.max_objects})"
        )

    def object_count(self, rng: random.Random) -> int:
        if self.config.max_objects == 2 or rng.random() < self.config.two_object_fraction:
            return 2
        return rng.randint(3, self.config.max_objects)

    def _compose(self, rng: random.Random, mode: HeldOutMode) -> tuple[list[tuple[str, str]], list]:
        """Pick (colour, shape) per object, and the relations the layout must realise (force mode)."""
        n_objects = self.object_count(rng)
        pool = self._allowed_combos if mode == "exclude" else self._all_combos
        combos: list[tuple[str, str]] = []
        required: list[tuple[int, str, int]] = []
        if mode == "force":
            use_pair = self.heldout.colour_shape and (not self.heldout.relation or rng.random() < 0.5)
            if use_pair:
                combos.append(rng.choice(self.heldout.colour_shape))
            else:
                shape_a, relation, shape_b = rng.choice(self.heldout.relation)
                combos.append((rng.choice(COLOURS), shape_a))
                combos.append((rng.choice(COLOURS), shape_b))  # held-out triples join two distinct shapes
                required.append((0, relation, 1))
        while len(combos) < n_objects:
            combos.append(self._next_combo(rng, combos, pool))
        return combos, required

    @staticmethod
    def _next_combo(rng: random.Random, combos: list, pool: list) -> tuple[str, str]:
        # A repeated shape in another colour makes counting and "which circle" captions possible.
        free = [p for p in pool if p not in combos]
        if combos and rng.random() < 0.3:
            shapes = {s for _, s in combos}
            same_shape = [p for p in free if p[1] in shapes]
            if same_shape:
                return rng.choice(same_shape)
        return rng.choice(free)

    def _place(self, rng, combos, sizes, required, mode) -> list[tuple[int, int, int, str]] | None:
        """(x, y, side, size) per object satisfying the layout rules, or None; shrinks a large shape when crowded."""
        sizes = list(sizes)
        for attempt in range(self.MAX_PLACEMENT_TRIES):
            if attempt and attempt % 15 == 0 and "large" in sizes:
                sizes[sizes.index("large")] = "small"
            sides = [rng.randint(*(self.rules.large_side if s == "large" else self.rules.small_side)) for s in sizes]
            boxes = [self._random_box(rng, side) for side in sides]
            if self._layout_ok(boxes, combos, required, mode):
                return [(x, y, side, size) for (x, y, side), size in zip(boxes, sizes)]
        return None

    def _random_box(self, rng: random.Random, side: int) -> tuple[int, int, int]:
        high = self.rules.image_size - self.rules.border - side
        return rng.randint(self.rules.border, high), rng.randint(self.rules.border, high), side

    def _layout_ok(self, boxes, combos, required, mode) -> bool:
        probes = [_Probe(x, y, side, side) for x, y, side in boxes]
        for a, b in combinations(probes, 2):
            if not pair_is_unambiguous(a, b, self.rules.gap, self.config.diagonal_pairs):
                return False
        for a, relation, b in required:
            if not holds(probes[a], relation, probes[b], self.rules.gap):
                return False
        if mode == "exclude" and self._heldout_triples:
            for a, b in permutations(range(len(probes)), 2):
                for relation in CANONICAL_RELATIONS:
                    triple = (combos[a][1], relation, combos[b][1])
                    if triple in self._heldout_triples and holds(probes[a], relation, probes[b], self.rules.gap):
                        return False
        return True

    def _build_scene(self, rng, combos, placed, object_ids) -> Scene:
        background = _light_background(rng)
        objects = tuple(
            SceneObject(
                object_id=object_ids[k],
                shape=shape,
                colour=colour,
                size=size,
                x=x,
                y=y,
                w=side,
                h=side,
                rgb=jitter_colour(rng, COLOUR_RGB[colour]),
            )
            for k, ((colour, shape), (x, y, side, size)) in enumerate(zip(combos, placed))
        )
        return Scene(
            width=self.config.image_size, height=self.config.image_size, background=background, objects=objects
        )

    def single_object_scene(self, rng: random.Random, colour: str, shape: str, object_id: str) -> Scene:
        """One object of a given class anywhere in the image (zero-shot recognition)."""
        size = rng.choice(SIZES)
        side = rng.randint(*(self.rules.large_side if size == "large" else self.rules.small_side))
        x, y, _ = self._random_box(rng, side)
        obj = SceneObject(object_id, shape, colour, size, x, y, side, side, jitter_colour(rng, COLOUR_RGB[colour]))
        return Scene(self.config.image_size, self.config.image_size, _light_background(rng), (obj,))


@dataclass(frozen=True)
class _Probe:
    """A bare box, so layout checks reuse the same geometry functions as finished objects."""

    x: int
    y: int
    w: int
    h: int


def jitter_colour(rng: random.Random, rgb: tuple[int, int, int], spread: int = 12) -> tuple[int, int, int]:
    """A slightly varied shade, so colour is learnt as a region of colour space, not one exact value.

    Mostly a shared lightness shift: independent per-channel noise would tint the grays.
    """
    shift = rng.randint(-spread, spread)
    return tuple(min(255, max(0, c + shift + rng.randint(-3, 3))) for c in rgb)  # type: ignore[return-value]


def _light_background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(236, 250)
    return tuple(min(255, base + rng.randint(-4, 4)) for _ in range(3))  # type: ignore[return-value]
