"""The LLaVA stages, one function per rule: train the demo LLaVA, swap a tower in (answering: hnclip.llava.infer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from hnclip.io import write_json
from hnclip.llava.demo_model import build_demo_llava, demo_image_processor, save_demo_llava
from hnclip.llava.export import to_hf_vision_model
from hnclip.llava.pretrain import demo_tokenizer_texts, pretrain_demo_llava
from hnclip.llava.tokenizer import train_demo_tokenizer
from hnclip.llava.tower_delta import export_tower_delta, write_full_checkpoint
from hnclip.models import default_device, load_clip
from hnclip.provenance import provenance

log = logging.getLogger(__name__)


def pretrain_llava(
    *, baseline_weights, model_name: str, train_questions: Sequence, captions: Sequence, out_dir, log_path,
    settings: dict, seed: int, config: dict | None = None,
) -> None:
    """The demo LLaVA: the baseline tower (frozen), a tokenizer of the training texts' words, a tiny Llama and a
    projector trained as LLaVA-1.5 trains: alignment on the HNC training captions, then the synthetic VQA/TextVQA
    train questions. ``settings`` holds the config's ``llava.align_*`` and ``llava.pretrain_*`` keys."""
    clip, _, _ = load_clip(model_name, baseline_weights)
    tower = to_hf_vision_model(clip)
    work = Path(log_path).with_suffix(".tokenizer")
    texts = demo_tokenizer_texts(train_questions, captions)
    tokenizer = train_demo_tokenizer(texts, work)
    model = build_demo_llava(tower, tokenizer, seed=seed)
    mean, std = clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"]
    processor = demo_image_processor(tower.config, image_mean=mean, image_std=std)
    model.to(default_device())
    summary = pretrain_demo_llava(
        model, tokenizer, processor, list(train_questions), steps=settings["pretrain_steps"],
        lr=settings["pretrain_lr"], batch_size=settings["pretrain_batch_size"], seed=seed, log_path=log_path,
        max_turns=settings["pretrain_max_turns"], ocr_prompt_fraction=settings["pretrain_ocr_fraction"],
        caption_parquets=list(captions), alignment_steps=settings["align_steps"],
        alignment_batch_size=settings["align_batch_size"], alignment_lr=settings["align_lr"],
    )
    log.info("demo LLaVA trained: %s", summary)
    save_demo_llava(model.cpu(), tokenizer, processor, out_dir,
                    extra={"training": summary, "provenance": provenance(config, seed=seed,
                                                                         inputs=[baseline_weights])})


def export(*, base_dir, model_name: str, weights, out_dir, config: dict | None = None) -> None:
    """The model's LLaVA as a tower delta of the base: its tower alone, LLM, projector and tokenizer the base's."""
    clip, _, _ = load_clip(model_name, weights)
    summary = export_tower_delta(base_dir, clip, out_dir, tower_name=model_name)
    write_json(Path(out_dir) / "export.json", {"summary": summary, "provenance": provenance(
        config, inputs=[weights], base_llava=str(base_dir))})


def export_full(*, delta_dir, out_dir, config: dict | None = None) -> None:
    """A complete HF checkpoint of a model's LLaVA, for loading it elsewhere with ``from_pretrained``."""
    summary = write_full_checkpoint(delta_dir, out_dir)
    write_json(Path(out_dir) / "export.json", {"summary": summary, "provenance": provenance(
        config, inputs=[Path(delta_dir) / "llava_delta.json"])})
