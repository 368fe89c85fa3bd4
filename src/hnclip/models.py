"""Create, save and load the CLIP models of the pipeline (open_clip), weights as safetensors only.

The demo's tiny architecture is an open_clip model config shipped in ``hnclip/model_configs`` and registered
here, so ``open_clip.create_model("hnclip-tiny")`` works like any built-in name and no hub download happens.
``hnclip-tiny-336`` reads images as ViT-L-14-336 does (336 px, patch 14: 577 tokens) with a tiny width: the scale
rehearsal's tests measure memory against image counts with it, at a fraction of ViT-L's compute.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from hnclip.io import atomic_path

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)


def default_device() -> str:
    """The device a stage runs on: the job's GPU when it has one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class WeightsMismatchError(RuntimeError):
    """A weights file does not fit the architecture it is loaded into."""


def create_clip(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """An open_clip model, its eval-time image transform and its tokenizer.

    ``pretrained`` is an open_clip tag (``openai``) or a weights file; None = random init (demo baseline).
    """
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, load_weights=pretrained is not None
    )
    return model, preprocess, open_clip.get_tokenizer(model_name)


def save_clip(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights as safetensors, atomically (tied tensors are stored once each)."""
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def load_clip_weights(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load safetensors weights into ``model`` with strict key and shape checks."""
    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(
            f"{path}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {sorted(wrong_shape)[:5]})"
        )
    model.load_state_dict(state, strict=True)
    return model


def load_clip(model_name: str, weights: str | os.PathLike, device: str | torch.device = "cpu"):
    """A model of architecture ``model_name`` with the weights of a safetensors file, plus transform/tokenizer."""
    model, preprocess, tokenizer = create_clip(model_name, pretrained=None, device=device)
    load_clip_weights(model, weights)
    return model.eval(), preprocess, tokenizer


# --- the penultimate layer, what LLaVA reads ------------------------------------------------------------------------

class _CapturedInput(Exception):
    """Raised by the hook to stop the forward pass once the penultimate tokens are captured."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__("penultimate tokens captured")
        self.tokens = tokens


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    # open_clip's Transformer calls each block as block(x, attn_mask=...) (through checkpoint(block, x, ...) with
    # activation checkpointing): x is the first positional argument (named q_x in the block's signature).
    return args[0] if args else kwargs["q_x"]


def _patch_tokens(visual: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # open_clip 3.x runs blocks batch-first (N, L, D) unless the transformer was built otherwise.
    if not getattr(visual.transformer, "batch_first", True):
        tokens = tokens.transpose(0, 1)
    patches = math.prod(visual.grid_size)
    return tokens[:, tokens.shape[1] - patches:, :]  # prefix tokens (CLS) come first


def penultimate_patch_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B × patches × width: the input of the vision tower's last residual block, CLS token dropped.

    This is HF's ``hidden_states[-2]`` with ``vision_feature_select_strategy="default"``, LLaVA's input.
    Captured with a forward pre-hook on ``model.visual.transformer.resblocks[-1]``; the rest of the
    forward pass (last block, pooling, projection) is skipped. Call under ``evaluation_mode``.
    """
    visual = model.visual

    def stop_with_block_input(_module, args, kwargs):
        raise _CapturedInput(_block_input(args, kwargs))

    handle = visual.transformer.resblocks[-1].register_forward_pre_hook(stop_with_block_input, with_kwargs=True)
    try:
        visual(images)
    except _CapturedInput as captured:
        tokens = captured.tokens
    else:
        raise RuntimeError("the last vision block never ran: cannot capture penultimate tokens")
    finally:
        handle.remove()
    return _patch_tokens(visual, tokens)


def encode_image_with_patches(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode_image(images)`` and the penultimate patch tokens of the same forward pass (with their graph
    when gradients are on): what the training's feature anchor compares with the frozen baseline's."""
    visual = model.visual
    captured: list[torch.Tensor] = []

    def keep_block_input(_module, args, kwargs):
        if not captured:  # the forward's own call (the hook is gone before a checkpointed backward recomputes it)
            captured.append(_block_input(args, kwargs))

    handle = visual.transformer.resblocks[-1].register_forward_pre_hook(keep_block_input, with_kwargs=True)
    try:
        features = model.encode_image(images)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the last vision block never ran: cannot capture penultimate tokens")
    return features, _patch_tokens(visual, captured[0])
