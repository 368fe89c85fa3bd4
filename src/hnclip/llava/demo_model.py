"""The demo LLaVA: a tiny transformers ``LlavaForConditionalGeneration`` around the demo CLIP tower.

Same architecture family as ``llava-hf/llava-1.5-7b-hf`` (CLIP vision tower read at layer -2 without CLS,
two-layer GELU projector, Llama language model), sized to train on a CPU in minutes. Saved as an ordinary
HF checkpoint directory, so the export stage swaps towers into it exactly as into the real one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from hnclip.io import atomic_dir, write_json
from hnclip.llava.prompt import LLAVA_PAD_COLOUR, num_image_tokens, pad_colour_from_mean
from hnclip.llava.tokenizer import image_token_id

PROTOCOL_FILE = "llava_protocol.json"
DEMO_MAX_POSITIONS = 512
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DemoLlavaError(ValueError):
    """The tower, tokenizer or sizes given cannot make a working demo LLaVA."""


def _vision_config_of(vision_model: torch.nn.Module | CLIPVisionConfig) -> CLIPVisionConfig:
    config = vision_model if isinstance(vision_model, CLIPVisionConfig) else vision_model.config
    if getattr(config, "model_type", None) != "clip_vision_model":
        raise DemoLlavaError(f"expected a CLIP vision tower, got config type {getattr(config, 'model_type', None)!r}")
    if config.num_hidden_layers < 2:
        raise DemoLlavaError("LLaVA reads the penultimate layer: the tower needs at least 2 layers")
    # A clean CLIPVisionConfig: projection-model configs carry the same fields.
    return CLIPVisionConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")})


def _tower_weights(vision_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors under the keys of LLaVA's ``CLIPVisionModel`` (no ``vision_model.``, no projection).

    transformers 5's ``CLIPVisionModel`` has no ``vision_model.`` prefix while ``CLIPVisionModelWithProjection``
    has one plus ``visual_projection``, which LLaVA never uses.
    """
    state = vision_model.state_dict()
    prefix = "vision_model."
    if any(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in state.items() if not key.startswith("visual_projection.")}


def demo_llama_config(
    tokenizer: PreTrainedTokenizerBase, *, hidden: int, layers: int, heads: int, intermediate: int | None, max_positions: int
) -> LlamaConfig:
    if hidden % heads:
        raise DemoLlavaError(f"text_hidden {hidden} is not divisible by text_heads {heads}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_demo_llava(
    vision_model: torch.nn.Module | CLIPVisionConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    max_positions: int = DEMO_MAX_POSITIONS,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A tiny LLaVA-1.5-style model: ``vision_model``'s tower (weights copied), GELU MLP projector, tiny Llama.

    ``vision_model`` is a ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (its weights are copied,
    the projection dropped), or a bare ``CLIPVisionConfig`` for a randomly initialised tower (benchmarks).
    Projector and language model are initialised from ``seed``; the tower is left in eval mode.
    """
    vision_config = _vision_config_of(vision_model)
    text_config = demo_llama_config(
        tokenizer, hidden=text_hidden, layers=text_layers, heads=text_heads,
        intermediate=text_intermediate, max_positions=max_positions,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id(tokenizer),
        image_seq_length=num_image_tokens(vision_config, VISION_FEATURE_SELECT_STRATEGY),
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if not isinstance(vision_model, CLIPVisionConfig):
        model.model.vision_tower.load_state_dict(_tower_weights(vision_model), strict=True)
    model.model.vision_tower.eval()
    _set_greedy_generation_defaults(model, tokenizer)
    return model


def _set_greedy_generation_defaults(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Greedy decoding by default, with the tokenizer's special ids, so ``generate`` needs no extra arguments."""
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    generation.num_beams = 1


def demo_image_processor(
    vision_config: CLIPVisionConfig,
    *,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> CLIPImageProcessorPil:
    """CLIP preprocessing at the tower's resolution (bicubic resize of the short side, centre crop, normalise).

    The PIL backend, like the ``CLIPImageProcessor`` LLaVA-1.5 was evaluated with.
    """
    size = int(vision_config.image_size)
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def protocol_record(model: LlavaForConditionalGeneration, image_processor, pad_colour=None) -> dict[str, Any]:
    """What inference needs beyond the HF files: the expand2square colour and the prompt/feature conventions."""
    colour = tuple(pad_colour) if pad_colour is not None else pad_colour_from_mean(image_processor.image_mean)
    return {
        "pad_colour": list(colour),
        "prompt": "vicuna_v1",
        "image_token_id": int(model.config.image_token_id),
        "num_image_tokens": num_image_tokens(model.config.vision_config, model.config.vision_feature_select_strategy),
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
    }


def save_demo_llava(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_processor_cfg: CLIPImageProcessorPil | dict,
    out_dir: str | os.PathLike,
    *,
    pad_colour: Sequence[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete HF LLaVA checkpoint directory atomically; returns ``out_dir``.

    Contents: ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer files,
    ``preprocessor_config.json`` (a CLIP image processor at the tower's size/mean/std) and
    ``llava_protocol.json`` (pad colour, default: LLaVA's rule applied to the processor mean; ``extra``
    is merged in, e.g. training provenance). ``image_processor_cfg`` is a processor or its keyword dict.
    """
    image_processor = (
        CLIPImageProcessorPil(**image_processor_cfg) if isinstance(image_processor_cfg, dict) else image_processor_cfg
    )
    protocol = {**protocol_record(model, image_processor, pad_colour), **(extra or {})}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        write_json(tmp / PROTOCOL_FILE, protocol)
    return out_dir


__all__ = [
    "LLAVA_PAD_COLOUR", "PROTOCOL_FILE", "DemoLlavaError", "build_demo_llava", "demo_image_processor",
    "demo_llama_config", "protocol_record", "save_demo_llava",
]


# ----------------------------------------------------------------------------------------------------------------
# A toy question table in the preprocess stage's schema, for tests and benchmarks that must not depend on the
# synthetic-world generator: one or two coloured shapes per image, or a sign with one large glyph.
# ----------------------------------------------------------------------------------------------------------------

TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_GLYPHS = "ABEHKMRSTX2345789"
TOY_IMAGE_SIZE = 64


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)


def _toy_shape_image(rng, width: int, height: int):
    from PIL import Image, ImageDraw

    colour, shape, count = rng.choice(list(TOY_COLOURS)), rng.choice(TOY_SHAPES), rng.choice((1, 2))
    image = Image.new("RGB", (width, height), (230, 230, 230))
    draw = ImageDraw.Draw(image)
    side = min(width // (count + 1), height - 8)
    for k in range(count):
        left = (k + 1) * width // (count + 1) - side // 2
        top = (height - side) // 2
        _draw_shape(draw, shape, (left, top, left + side, top + side), TOY_COLOURS[colour])
    return image, colour, shape, count


def _toy_sign_image(rng):
    from PIL import Image, ImageDraw, ImageFont

    glyph = rng.choice(TOY_GLYPHS)
    image = Image.new("RGB", (TOY_IMAGE_SIZE, TOY_IMAGE_SIZE), (90, 140, 90))
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 6, TOY_IMAGE_SIZE - 7, TOY_IMAGE_SIZE - 7), fill=(250, 250, 250))
    font = ImageFont.load_default(size=44)
    draw.text((TOY_IMAGE_SIZE // 2, TOY_IMAGE_SIZE // 2), glyph, fill=(0, 0, 0), font=font, anchor="mm")
    return image, glyph.lower()


def _annotator_answers(rng, truth: str, alternatives: Sequence[str], agreement: float = 0.8) -> list[str]:
    """Ten answers, each the truth with probability ``agreement``, else another answer of the same kind."""
    wrong = [a for a in alternatives if a != truth]
    return [truth if rng.random() < agreement else rng.choice(wrong) for _ in range(10)]


def _toy_row(dataset, question_id, image_id, image_path, question, answers, answer_type, question_type, ocr=()):
    from collections import Counter

    return {
        "dataset": dataset, "question_id": question_id, "image_id": image_id, "image_path": str(image_path),
        "question": question, "answers": answers, "answer_type": answer_type, "question_type": question_type,
        "majority_answer": Counter(answers).most_common(1)[0][0], "ocr_tokens": list(ocr),
        "ocr_source": "toy" if dataset == "textvqa" else "",
    }


def _toy_shape_questions(rng, index: int, path: Path, colour: str, shape: str, count: int) -> list[dict]:
    other_colour = rng.choice([c for c in TOY_COLOURS if c != colour])
    asked_colour = rng.choice((colour, other_colour))
    specs = [
        (f"What color is the {shape}?", colour, list(TOY_COLOURS), "other", "what color is the"),
        ("What shape is shown?", shape, list(TOY_SHAPES), "other", "what shape is"),
        (f"How many {shape}s are there?", str(count), ["1", "2"], "number", "how many"),
        (f"Is the {shape} {asked_colour}?", "yes" if asked_colour == colour else "no", ["yes", "no"], "yes/no", "is the"),
    ]
    return [
        _toy_row("vqav2", index * 10 + k, f"toy{index:05d}", path, q, _annotator_answers(rng, truth, alts), atype, qtype)
        for k, (q, truth, alts, atype, qtype) in enumerate(specs)
    ]


def _toy_sign_question(rng, index: int, path: Path, glyph: str) -> dict:
    kind = "number" if glyph.isdigit() else "letter"
    # The OCR tokens are right most of the time, as a real OCR system's would be.
    ocr = [glyph] if rng.random() < 0.8 else [rng.choice(TOY_GLYPHS).lower()]
    answers = _annotator_answers(rng, glyph, [g.lower() for g in TOY_GLYPHS], agreement=0.9)
    return _toy_row("textvqa", index * 10, f"sign{index:05d}", path, f"what {kind} is on the sign?", answers,
                    "other", f"what {kind}", ocr)


def write_toy_vqa_questions(out_dir: str | os.PathLike, *, n_images: int = 40, seed: int = 0, sign_fraction: float = 0.3):
    """Write ``n_images`` toy JPEGs (some 64x48, to exercise square padding) and return their question table.

    Shape images get four VQA-v2-style questions (colour, shape, count, yes/no); sign images one
    TextVQA-style question with OCR tokens. Rows follow the preprocess stage's schema. Deterministic in ``seed``.
    """
    import random

    import pandas as pd

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index in range(n_images):
        path = out_dir / f"toy_{index:05d}.jpg"
        if rng.random() < sign_fraction:
            image, glyph = _toy_sign_image(rng)
            rows.append(_toy_sign_question(rng, index, path, glyph))
        else:
            height = TOY_IMAGE_SIZE if index % 3 else TOY_IMAGE_SIZE * 3 // 4
            image, colour, shape, count = _toy_shape_image(rng, TOY_IMAGE_SIZE, height)
            rows.extend(_toy_shape_questions(rng, index, path, colour, shape, count))
        image.save(path, quality=95)
    table = pd.DataFrame(rows)
    table["question_id"] = table["question_id"].astype("int64")
    return table
