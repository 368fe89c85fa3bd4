"""Drawing scenes and signs with PIL, deterministically (no system fonts: glyphs come from a built-in bitmap)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from hnclip.synth.world import Scene, SceneObject

# Shapes are drawn at this multiple of the final size and box-filtered down: smooth edges without
# depending on PIL's (absent) polygon anti-aliasing.
SUPERSAMPLE = 4

# A 5 x 7 bitmap font: the zero is slashed and the one has a flag so that O/0 and I/1 stay apart.
GLYPH_ROWS: dict[str, tuple[str, ...]] = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "B": ("11110", "10001", "10001", "11110", "10001", "10001", "11110"),
    "C": ("01111", "10000", "10000", "10000", "10000", "10000", "01111"),
    "D": ("11110", "10001", "10001", "10001", "10001", "10001", "11110"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "F": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "G": ("01111", "10000", "10000", "10011", "10001", "10001", "01111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "I": ("11111", "00100", "00100", "00100", "00100", "00100", "11111"),
    "J": ("00111", "00010", "00010", "00010", "00010", "10010", "01100"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "N": ("10001", "11001", "10101", "10011", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "Q": ("01110", "10001", "10001", "10001", "10101", "10010", "01101"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "S": ("01111", "10000", "10000", "01110", "00001", "00001", "11110"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "V": ("10001", "10001", "10001", "10001", "10001", "01010", "00100"),
    "W": ("10001", "10001", "10001", "10101", "10101", "11011", "10001"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "Y": ("10001", "10001", "01010", "00100", "00100", "00100", "00100"),
    "Z": ("11111", "00001", "00010", "00100", "01000", "10000", "11111"),
    "0": ("01110", "10011", "10101", "10101", "10101", "11001", "01110"),
    "1": ("00100", "01100", "10100", "00100", "00100", "00100", "11111"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7

# Sign boards and the ink that reads on them.
SIGN_STYLES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((250, 250, 245), (20, 20, 20)),
    ((245, 205, 30), (15, 15, 15)),
    ((30, 70, 170), (250, 250, 250)),
    ((30, 130, 60), (250, 250, 250)),
    ((200, 30, 30), (250, 250, 250)),
    ((25, 25, 25), (250, 250, 250)),
)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.width`` x ``scene.height`` pixels."""
    big = Image.new("RGB", (scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE), scene.background)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        draw_shape(draw, obj, SUPERSAMPLE)
    return big.reduce(SUPERSAMPLE)


def draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int) -> None:
    """Fill the shape so that it touches all four sides of its box (the box is the scene-graph box)."""
    x0, y0 = obj.x * scale, obj.y * scale
    x1, y1 = (obj.x + obj.w) * scale - 1, (obj.y + obj.h) * scale - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=obj.rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=obj.rgb)
    elif obj.shape == "cross":
        half_bar = (x1 - x0) / 6  # bars one third of the box wide
        draw.rectangle((x0, cy - half_bar, x1, cy + half_bar), fill=obj.rgb)
        draw.rectangle((cx - half_bar, y0, cx + half_bar, y1), fill=obj.rgb)
    else:
        raise ValueError(f"object {obj.object_id}: unknown shape {obj.shape!r}")


@dataclass(frozen=True)
class SignImage:
    image: Image.Image
    word_box: tuple[int, int, int, int]  # x, y, w, h of the written word, in pixels


def glyph_cell_size(image_size: int, n_glyphs: int) -> int:
    """Pixels per font cell: the word fills most of the sign, so it stays legible at half resolution."""
    cells_wide = n_glyphs * GLYPH_WIDTH + (n_glyphs - 1)
    by_width = int(0.74 * image_size / cells_wide)
    by_height = int(0.58 * image_size / GLYPH_HEIGHT)
    return max(1, min(by_width, by_height))


def render_sign(word: str, image_size: int, rng: random.Random) -> SignImage:
    """A sign board with ``word`` (one or two glyphs) in large block letters, on a plain backdrop with a post."""
    unknown = [g for g in word if g not in GLYPH_ROWS]
    if unknown or not 1 <= len(word) <= 2:
        raise ValueError(f"cannot draw sign word {word!r}: one or two glyphs from A-Z, 0-9")
    cell = glyph_cell_size(image_size, len(word))
    word_w = (len(word) * GLYPH_WIDTH + len(word) - 1) * cell
    word_h = GLYPH_HEIGHT * cell
    pad = max(2, cell)
    board_w, board_h = word_w + 2 * pad, word_h + 2 * pad
    board_x = rng.randint(1, image_size - board_w - 1)
    board_y = rng.randint(1, max(1, image_size - board_h - max(3, image_size // 8)))
    backdrop = tuple(rng.randint(150, 215) for _ in range(3))
    board, ink = rng.choice(SIGN_STYLES)
    image = Image.new("RGB", (image_size, image_size), backdrop)
    draw = ImageDraw.Draw(image)
    post_x = board_x + board_w // 2
    draw.rectangle(
        (post_x - max(1, cell // 2), board_y + board_h, post_x + max(1, cell // 2), image_size - 1), fill=(90, 90, 90)
    )
    draw.rectangle((board_x, board_y, board_x + board_w - 1, board_y + board_h - 1), fill=board)
    word_x, word_y = board_x + pad, board_y + pad
    for k, glyph in enumerate(word):
        _draw_glyph(draw, glyph, word_x + k * (GLYPH_WIDTH + 1) * cell, word_y, cell, ink)
    return SignImage(image=image, word_box=(word_x, word_y, word_w, word_h))


def _draw_glyph(draw: ImageDraw.ImageDraw, glyph: str, x: int, y: int, cell: int, ink) -> None:
    for row, bits in enumerate(GLYPH_ROWS[glyph]):
        for col, bit in enumerate(bits):
            if bit == "1":
                left, top = x + col * cell, y + row * cell
                draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=ink)


def save_jpeg(image: Image.Image, path: str | os.PathLike, quality: int) -> None:
    """JPEG without chroma subsampling: 4:2:0 would smear the colour of a 6-pixel shape into its neighbours."""
    image.save(path, format="JPEG", quality=quality, subsampling=0, optimize=False)
