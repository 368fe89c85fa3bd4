"""Create, save and load the CLIP models of the pipeline (open_clip), weights as safetensors only.

The demo's tiny architecture is an open_clip model config shipped in ``hnclip/model_configs`` and registered
here, so ``open_clip.create_model("hnclip-tiny")`` works like any built-in name and no hub download happens.
``hnclip-tiny-336`` reads images as ViT-L-14-336 does (336 px, patch 14: 577 tokens) with a tiny width: the scale
rehearsal's tests measure memory against image counts with it, at a fraction of ViT-L's compute.
"""

from __future__ import annotations

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
