"""A stand-in for ``llava-hf/llava-1.5-7b-hf`` with the real vision tower's shapes and a tiny language model.

Export and VQA work on the vision tower: export swaps a fine-tuned tower in key for key, VQA runs it on every
image and feeds its 576 patch tokens (336 px, patch 14) to the language model. A rehearsal of those stages at
scale needs that tower at its real size, but not a 7 B language model that a rehearsal machine cannot hold. This
base is built exactly as the demo's LLaVA (``hnclip.llava.stage.pretrain_llava``: the converted open_clip tower,
a word-level demo tokenizer, a tiny Llama, a CLIP image processor at the tower's size), with a randomly initialised
tower of ``clip_name`` and no training, and stored in float16 like the real base, so export writes its tower in the
real dtype and VQA reads the real number of bytes per image token.

Its answers are noise: it measures memory and time, not accuracy.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from hnclip.llava.demo_model import build_demo_llava, demo_image_processor, save_demo_llava
from hnclip.llava.export import describe_tower, to_hf_vision_model
from hnclip.llava.prompt import OCR_LINE_PREFIX, llava15_prompt
from hnclip.llava.tokenizer import train_demo_tokenizer
from hnclip.models import create_clip, save_clip
from hnclip.provenance import provenance
from hnclip.rehearsal.world import ATTRIBUTES, NOUNS, NUMBERS, RELATIONS, SIGN_WORDS, TEMPLATES

log = logging.getLogger(__name__)

STANDS_IN_FOR = "llava-hf/llava-1.5-7b-hf"
# Llama-2's context, as in the real base: the demo's 512 positions would not hold 576 image tokens plus a prompt.
MAX_POSITIONS = 4096
BASE_DTYPE = torch.float16  # the dtype llava-1.5-7b-hf's weights are stored in


def rehearsal_tokenizer_texts() -> Iterator[str]:
    """The words the tokenizer keeps whole: the LLaVA prompt, the rehearsal world's vocabulary and its answers.

    Anything else (a word a fine-tuned tower's VQA run might produce) is spelled character by character.
    """
    yield OCR_LINE_PREFIX
    yield llava15_prompt("What color is the cup?")
    yield " ".join([*NOUNS, *NOUNS.values(), *ATTRIBUTES, *RELATIONS, *NUMBERS, *SIGN_WORDS, "yes", "no"])
    yield from (template for template, _ in TEMPLATES.values())
    yield " ".join(str(n) for n in range(10))


def _random_clip(clip_name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    clip, _, _ = create_clip(clip_name)
    return clip


def _rehearsal_tokenizer():
    with tempfile.TemporaryDirectory(prefix="rehearsal-tokenizer-") as work:
        tokenizer = train_demo_tokenizer(rehearsal_tokenizer_texts(), work)
    tokenizer.model_max_length = MAX_POSITIONS  # the language model's context, not the demo's 1,024
    return tokenizer


def _rehearsal_record(model, clip_name: str, seed: int, dtype: torch.dtype) -> dict:
    """What ``llava_protocol.json`` says about this base: what it stands in for and how it differs."""
    text = model.config.text_config
    return {"clip_name": clip_name, "seed": seed, "stands_in_for": STANDS_IN_FOR, "dtype": str(dtype),
            "tower": describe_tower(model.config.vision_config),
            "text_model": {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size}}


def write_rehearsal_llava_base(
    out_dir: str | os.PathLike,
    *,
    clip_name: str = "ViT-L-14-336-quickgelu",
    seed: int = 0,
    dtype: torch.dtype = BASE_DTYPE,
    clip_weights_out: str | os.PathLike | None = None,
) -> Path:
    """Write a LLaVA base checkpoint directory (atomically) with ``clip_name``'s tower shapes; returns ``out_dir``.

    Loadable with ``LlavaForConditionalGeneration.from_pretrained`` and ``load_llava_for_inference``; the tower
    fits ``check_tower_fits_llava`` for every tower converted from ``clip_name``. Deterministic for a seed.
    ``clip_weights_out``: also save the whole random CLIP there (safetensors, the config's ``clip_weights``), so the
    baseline of a rehearsal run has the base's tower, as OpenAI's ViT-L-14-336 is llava-1.5's, and needs no download.
    """
    clip = _random_clip(clip_name, seed)
    if clip_weights_out is not None:
        save_clip(clip, clip_weights_out, metadata={"model_name": clip_name, "rehearsal_seed": str(seed)})
    tower = to_hf_vision_model(clip)
    mean, std = clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"]
    del clip  # the text tower and the open_clip copy of the vision tower: ~1.7 GB at ViT-L
    gc.collect()
    tokenizer = _rehearsal_tokenizer()
    model = build_demo_llava(tower, tokenizer, seed=seed, max_positions=MAX_POSITIONS)
    processor = demo_image_processor(tower.config, image_mean=mean, image_std=std)
    del tower
    gc.collect()
    model.to(dtype)
    record = _rehearsal_record(model, clip_name, seed, dtype)
    save_demo_llava(model, tokenizer, processor, out_dir,
                    extra={"rehearsal": record, "provenance": provenance(seed=seed, clip_name=clip_name)})
    log.info("rehearsal LLaVA base (%s tower, %s) written to %s", record["tower"], dtype, out_dir)
    return Path(out_dir)
