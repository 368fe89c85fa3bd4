"""Export an open_clip vision tower into HF transformers: a ``CLIPVisionModelWithProjection`` and a LLaVA checkpoint.

The pipeline fine-tunes CLIP with open_clip, but LLaVA-1.5 runs in transformers. This module

1. converts an OpenAI-style open_clip ViT into ``CLIPVisionModelWithProjection`` (``to_hf_vision_model``) so that
   the HF model's ``hidden_states[-2]`` is open_clip's input to the last residual block (what LLaVA reads) and
   ``image_embeds`` is open_clip's ``encode_image`` (unnormalised);
2. checks that a tower fits a base LLaVA (``check_tower_fits_llava``): same width, patch, resolution and depth;
3. swaps the tower into a ``LlavaForConditionalGeneration`` with strict key matching (``replace_vision_tower``);
4. verifies a written checkpoint by loading it back (``_verify_reloaded``). What the pipeline stores per model is
   the tower alone, assembled with the base at load (``hnclip.llava.tower_delta``).

Anything the HF CLIP architecture cannot express exactly is refused with ``UnsupportedTowerError`` rather than
approximated: a silently different tower would make every downstream VQA number meaningless.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn


logger = logging.getLogger(__name__)

# Files of a HF checkpoint that hold weights or the model config: save_pretrained writes these afresh, everything
# else in the base directory (tokenizer, processor, chat template, generation config) is copied byte for byte.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_REWRITTEN_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}

# CLIPVisionModelWithProjection nests the tower under this prefix; LLaVA's tower is a bare CLIPVisionModel.
LLAVA_TOWER_PREFIX = "vision_model."


class UnsupportedTowerError(ValueError):
    """The open_clip vision tower uses a feature HF's CLIP vision architecture cannot reproduce exactly."""


class TowerMismatchError(ValueError):
    """The tower does not fit the base LLaVA (projector width, token count, depth, keys or preprocessing)."""


class ExportVerificationError(RuntimeError):
    """The written LLaVA checkpoint did not load back exactly as exported."""


# ----------------------------------------------------------------------------------------------------------------
# open_clip → CLIPVisionModelWithProjection
# ----------------------------------------------------------------------------------------------------------------


def _open_clip_vision_transformer(open_clip_model: nn.Module) -> nn.Module:
    """Return the model's ``visual`` tower if it is an open_clip ``VisionTransformer``; refuse anything else."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(open_clip_model, "visual", None)
    if visual is None:
        raise UnsupportedTowerError(
            f"{type(open_clip_model).__name__} has no `visual` attribute: "
            "not an open_clip CLIP model with a vision tower"
        )
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedTowerError(
            f"vision tower is a {type(visual).__name__} (timm or ResNet tower); only open_clip's OpenAI-style "
            "VisionTransformer maps onto HF CLIPVisionModel"
        )
    return visual


def _square_size(value: Any, what: str) -> int:
    """HF CLIP assumes square images and patches: return the side length or refuse."""
    height, width = (value, value) if isinstance(value, int) else tuple(value)
    if height != width:
        raise UnsupportedTowerError(f"non-square {what} {height}x{width}: HF CLIPVisionModel supports square only")
    return int(height)


def _unmappable_tower_features(visual: nn.Module) -> list[str]:
    """Every architectural feature of ``visual`` that HF CLIP cannot express, as human-readable reasons."""
    from open_clip.transformer import ResidualAttentionBlock

    reasons = []
    if getattr(visual, "attn_pool", None) is not None:
        reasons.append("attentional pooling (attentional_pool) replaces the class-token pooling HF CLIP uses")
    if getattr(visual, "pool_type", "tok") != "tok":
        reasons.append(f"pool_type {visual.pool_type!r}: HF CLIP pools the class token ('tok') only")
    # With 'tok' pooling final_ln_after_pool is exact anyway (LayerNorm acts per token), so it is not refused.
    if isinstance(visual.ln_pre, nn.Identity):
        reasons.append("no_ln_pre: HF CLIP always applies pre_layrnorm, which no weights can turn into an identity")
    if getattr(visual, "class_embedding", None) is None:
        reasons.append("no class token: HF CLIP prepends class_embedding")
    if visual.proj is None:
        reasons.append("no output projection (proj is None): CLIPVisionModelWithProjection needs one")
    for index, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock):
            reasons.append(
                f"block {index} is a {type(block).__name__} (qk_norm / scaled cosine attention / scale_* options)"
            )
            continue
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            reasons.append(f"block {index} has LayerScale (ls_init_value): HF CLIP has no per-channel residual scale")
        attn = block.attn
        if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.out_proj.bias is None:
            reasons.append(f"block {index} attention lacks a packed qkv projection with biases")
        if attn.bias_k is not None or attn.add_zero_attn:
            reasons.append(f"block {index} attention uses bias_k/bias_v or add_zero_attn")
        if block.mlp.c_fc.bias is None or block.mlp.c_proj.bias is None:
            reasons.append(f"block {index} MLP lacks biases")
    return reasons


def _hidden_act_name(visual: nn.Module) -> str:
    """The HF ``hidden_act`` computing exactly what the tower's MLP activation computes."""
    from open_clip.transformer import QuickGELU

    activations = {type(block.mlp.gelu) for block in visual.transformer.resblocks}
    act = visual.transformer.resblocks[0].mlp.gelu
    if len(activations) != 1:
        raise UnsupportedTowerError(f"mixed MLP activations across blocks: {sorted(a.__name__ for a in activations)}")
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        # HF "gelu" is F.gelu (erf); "gelu_pytorch_tanh" is F.gelu(approximate="tanh"): both bit-identical to torch's.
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise UnsupportedTowerError(f"MLP activation {type(act).__name__} has no HF CLIP hidden_act equivalent")


def _layer_norm_eps(visual: nn.Module) -> float:
    """The single LayerNorm epsilon of the tower (HF CLIP has one ``layer_norm_eps`` for all of its norms)."""
    norms = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    eps_values = {float(m.eps) for m in norms}
    if len(eps_values) != 1:
        raise UnsupportedTowerError(f"LayerNorms use different eps values {sorted(eps_values)}; HF CLIP has one")
    if not all(m.elementwise_affine and m.bias is not None for m in norms):
        raise UnsupportedTowerError("a LayerNorm has no affine weight/bias; HF CLIP's LayerNorms have both")
    return eps_values.pop()


def hf_vision_config_from_open_clip(open_clip_model: nn.Module):
    """Derive the ``CLIPVisionConfig`` that reproduces ``open_clip_model.visual`` exactly (refusing what it cannot)."""
    from transformers import CLIPVisionConfig

    visual = _open_clip_vision_transformer(open_clip_model)
    reasons = _unmappable_tower_features(visual)
    if reasons:
        raise UnsupportedTowerError("cannot map the open_clip vision tower onto HF CLIP: " + "; ".join(reasons))
    image_size = _square_size(visual.image_size, "image size")
    patch_size = _square_size(visual.patch_size, "patch size")
    width = visual.conv1.out_channels
    grid_tokens = (image_size // patch_size) ** 2
    if visual.positional_embedding.shape[0] != grid_tokens + 1:
        raise UnsupportedTowerError(
            f"positional_embedding has {visual.positional_embedding.shape[0]} rows, expected {grid_tokens + 1} "
            f"(class token + {grid_tokens} patches)"
        )
    first_block = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=first_block.mlp.c_fc.out_features,
        num_attention_heads=first_block.attn.num_heads,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_channels=visual.conv1.in_channels,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=visual.proj.shape[1],
        hidden_act=_hidden_act_name(visual),
        layer_norm_eps=_layer_norm_eps(visual),
    )


def _float32_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _converted_block_weights(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One open_clip residual block as HF ``CLIPEncoderLayer`` tensors (the packed qkv split into q, k, v)."""
    weights: dict[str, torch.Tensor] = {}
    # nn.MultiheadAttention packs the projections in q, k, v order along the output dimension.
    for name, w, b in zip(
        ("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)
    ):
        weights[f"{prefix}self_attn.{name}.weight"] = _float32_copy(w)
        weights[f"{prefix}self_attn.{name}.bias"] = _float32_copy(b)
    sources = {
        "self_attn.out_proj": block.attn.out_proj,
        "layer_norm1": block.ln_1,
        "layer_norm2": block.ln_2,
        "mlp.fc1": block.mlp.c_fc,
        "mlp.fc2": block.mlp.c_proj,
    }
    for hf_name, module in sources.items():
        weights[f"{prefix}{hf_name}.weight"] = _float32_copy(module.weight)
        weights[f"{prefix}{hf_name}.bias"] = _float32_copy(module.bias)
    return weights


def converted_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` tensors renamed (and reshaped) to ``CLIPVisionModelWithProjection`` keys."""
    weights = {
        "vision_model.embeddings.class_embedding": _float32_copy(visual.class_embedding),
        "vision_model.embeddings.patch_embedding.weight": _float32_copy(visual.conv1.weight),
        "vision_model.embeddings.position_embedding.weight": _float32_copy(visual.positional_embedding),
        "vision_model.pre_layrnorm.weight": _float32_copy(visual.ln_pre.weight),
        "vision_model.pre_layrnorm.bias": _float32_copy(visual.ln_pre.bias),
        "vision_model.post_layernorm.weight": _float32_copy(visual.ln_post.weight),
        "vision_model.post_layernorm.bias": _float32_copy(visual.ln_post.bias),
        # open_clip computes pooled @ proj with proj (width, embed); nn.Linear stores (out, in).
        "visual_projection.weight": _float32_copy(visual.proj.T),
    }
    for index, block in enumerate(visual.transformer.resblocks):
        weights.update(_converted_block_weights(block, f"vision_model.encoder.layers.{index}."))
    return weights


def to_hf_vision_model(open_clip_model: nn.Module):
    """Convert an open_clip CLIP model's ViT vision tower into a float32 ``CLIPVisionModelWithProjection`` (eval mode).

    Raises ``UnsupportedTowerError`` for towers HF CLIP cannot reproduce (LayerScale, attentional pooling, average
    pooling, custom attention blocks, timm/ResNet towers, missing pre-LayerNorm or projection, non-square inputs).
    Patch dropout is accepted: it is an identity at inference, which is all an exported tower does.
    """
    from transformers import CLIPVisionModelWithProjection

    config = hf_vision_config_from_open_clip(open_clip_model)
    hf_model = CLIPVisionModelWithProjection(config)
    hf_model.load_state_dict(converted_state_dict(open_clip_model.visual), strict=True)
    return hf_model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Fit against a base LLaVA
# ----------------------------------------------------------------------------------------------------------------


def patch_tokens(vision_config) -> int:
    """Patch tokens per image (CLS excluded): what LLaVA's default feature strategy feeds the projector."""
    return (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2


def describe_tower(vision_config) -> str:
    """A one-line shape summary, e.g. ``width 1024, patch 14, 336 px, 576 patch tokens, 24 layers``."""
    return (
        f"width {vision_config.hidden_size}, patch {vision_config.patch_size}, {vision_config.image_size} px, "
        f"{patch_tokens(vision_config)} patch tokens, {vision_config.num_hidden_layers} layers"
    )


def _feature_layer_in_range(feature_layer: int, num_layers: int) -> bool:
    # hidden_states holds the embeddings plus one entry per layer: num_layers + 1 entries.
    return -(num_layers + 1) <= feature_layer <= num_layers


def check_tower_fits_llava(vision_config, llava_config, *, tower_name: str = "converted") -> None:
    """Raise ``TowerMismatchError`` unless the tower can replace the base LLaVA's tower key for key.

    Fits means: the projector's input width, the patch size and resolution (so the number of image tokens the
    language model was trained on), and the depth (so every tower tensor is replaced and ``vision_feature_layer``
    names the same block) all agree. Attention heads, activation and LayerNorm eps may differ: they change no
    tensor shape and travel with the tower's own config.
    """
    llava_vision = llava_config.vision_config
    fields = ("hidden_size", "patch_size", "image_size", "num_hidden_layers", "num_channels")
    differing = [f for f in fields if getattr(vision_config, f) != getattr(llava_vision, f)]
    feature_layers = llava_config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    out_of_range = [k for k in feature_layers if not _feature_layer_in_range(k, vision_config.num_hidden_layers)]
    if differing or out_of_range:
        problems = [f"{f} {getattr(vision_config, f)} vs {getattr(llava_vision, f)}" for f in differing]
        problems += [f"vision_feature_layer {k} outside {vision_config.num_hidden_layers} layers" for k in out_of_range]
        raise TowerMismatchError(
            f"{tower_name} tower: {describe_tower(vision_config)}; LLaVA expects {describe_tower(llava_vision)} "
            f"({'; '.join(problems)})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Swap the tower into a LlavaForConditionalGeneration
# ----------------------------------------------------------------------------------------------------------------


def _tower_owner(llava_model: nn.Module) -> nn.Module:
    """The module holding ``vision_tower``: ``model.model`` in transformers 5, the model itself in older layouts."""
    for owner in (getattr(llava_model, "model", None), llava_model):
        if owner is not None and isinstance(getattr(owner, "vision_tower", None), nn.Module):
            return owner
    raise TowerMismatchError(f"{type(llava_model).__name__} has no vision_tower under .model or at the top level")


def llava_tower_state_dict(hf_vision_model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted tower's tensors under LLaVA's ``CLIPVisionModel`` keys (no projection, no ``vision_model.``)."""
    state = hf_vision_model.state_dict()
    return {k[len(LLAVA_TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(LLAVA_TOWER_PREFIX)}


def _merged_vision_config(llava_vision_config, tower_config):
    """LLaVA's vision config with every architecture field taken from the tower (so the module computes the same)."""
    merged = copy.deepcopy(llava_vision_config)
    for field in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_channels",
        "image_size", "patch_size", "hidden_act", "layer_norm_eps", "projection_dim",
    ):
        setattr(merged, field, getattr(tower_config, field))
    return merged


def _key_differences(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(old) - set(new))
    extra = sorted(set(new) - set(old))
    reshaped = [f"{k} {tuple(old[k].shape)}->{tuple(new[k].shape)}" for k in sorted(set(old) & set(new))
                if old[k].shape != new[k].shape]
    problems = []
    for label, keys in (("not replaced", missing), ("unexpected", extra), ("shape changed", reshaped)):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
    return problems


def replace_vision_tower(llava_model: nn.Module, hf_vision_model: nn.Module, *, tower_name: str = "converted") -> None:
    """Put the converted tower into ``llava_model`` in place; language model and projector are not touched.

    The new tower is built from LLaVA's vision config updated with the tower's architecture (heads, activation,
    eps travel with the weights), loaded with ``strict=True``, cast to the old tower's dtype and device, and must
    have exactly the old tower's keys and shapes: every tower tensor replaced, nothing added.
    """
    check_tower_fits_llava(hf_vision_model.config, llava_model.config, tower_name=tower_name)
    owner = _tower_owner(llava_model)
    old_tower = owner.vision_tower
    new_config = _merged_vision_config(llava_model.config.vision_config, hf_vision_model.config)
    new_weights = llava_tower_state_dict(hf_vision_model)
    problems = _key_differences(old_tower.state_dict(), new_weights)
    if problems:
        raise TowerMismatchError(f"{tower_name} tower keys do not match LLaVA's vision_tower: {'; '.join(problems)}")
    if new_config.hidden_act != llava_model.config.vision_config.hidden_act:
        # Legal (the activation travels with the tower), but OpenAI-weight towers built without QuickGELU land here.
        logger.warning(
            "%s tower uses %s where the base LLaVA's tower used %s", tower_name, new_config.hidden_act,
            llava_model.config.vision_config.hidden_act,
        )
    reference = next(old_tower.parameters())
    new_tower = type(old_tower)(new_config)
    new_tower.load_state_dict(new_weights, strict=True)
    new_tower.to(device=reference.device, dtype=reference.dtype).eval()
    owner.vision_tower = new_tower
    # One config object is shared by LlavaForConditionalGeneration and LlavaModel; save_pretrained writes it.
    llava_model.config.vision_config = new_config
    if owner.config is not llava_model.config:
        owner.config.vision_config = new_config


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint export
# ----------------------------------------------------------------------------------------------------------------


def _tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's exact bytes and dtype/shape (bf16 included), to prove it unchanged across save/load."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(raw.tobytes(), digest_size=16)
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    return digest.hexdigest()


def _non_tower_digests(llava_model: nn.Module) -> dict[str, str]:
    tower_prefixes = ("model.vision_tower.", "vision_tower.")
    return {k: _tensor_digest(v) for k, v in llava_model.state_dict().items() if not k.startswith(tower_prefixes)}


def _check_preprocessing_matches(base_llava_dir: Path, open_clip_model: nn.Module) -> None:
    """The base processor normalises pixels for the old tower; a tower trained with other mean/std would not fit."""
    processor_file = base_llava_dir / "preprocessor_config.json"
    preprocess_cfg = getattr(open_clip_model.visual, "preprocess_cfg", None)
    if not processor_file.is_file() or not preprocess_cfg:
        return
    processor = json.loads(processor_file.read_text())
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        tower_values, processor_values = preprocess_cfg.get(ours), processor.get(theirs)
        if tower_values is None or processor_values is None:
            continue
        if any(abs(float(a) - float(b)) > 1e-4 for a, b in zip(tower_values, processor_values)):
            raise TowerMismatchError(
                f"tower normalises with {ours} {list(tower_values)} but {processor_file} has {theirs} "
                f"{list(processor_values)}"
            )


def _copy_side_files(base_llava_dir: Path, out_dir: Path, written: set[str]) -> list[str]:
    """Copy tokenizer, processor, chat-template and other non-weight files save_pretrained did not write."""
    copied = []
    for source in sorted(base_llava_dir.iterdir()):
        name = source.name
        if not source.is_file() or name.startswith(".") or name in written or name in _REWRITTEN_FILES:
            continue
        if name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(source, out_dir / name)
        copied.append(name)
    return copied


def _verify_reloaded(
    checkpoint_dir: Path, expected_tower: dict[str, torch.Tensor], expected_rest: dict[str, str]
) -> None:
    """Load the written checkpoint the way the VQA stage will and demand an exact round trip."""
    from transformers import LlavaForConditionalGeneration

    reloaded, info = LlavaForConditionalGeneration.from_pretrained(
        checkpoint_dir, dtype="auto", output_loading_info=True
    )
    problems = [f"{k}: {sorted(map(str, info[k]))[:5]}" for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(k)]
    tower = _tower_owner(reloaded).vision_tower.state_dict()
    problems += _key_differences(expected_tower, tower)
    problems += [
        f"tower tensor {k} differs" for k, v in expected_tower.items() if k in tower and not torch.equal(v, tower[k])
    ]
    rest = _non_tower_digests(reloaded)
    problems += [f"non-tower tensor {k} changed or missing" for k, d in expected_rest.items() if rest.get(k) != d]
    if problems:
        raise ExportVerificationError(f"{checkpoint_dir} does not reload as exported: {'; '.join(problems[:10])}")


def _tower_summary(vision_config) -> dict[str, Any]:
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
              "image_size", "hidden_act", "layer_norm_eps")
    return {**{f: getattr(vision_config, f) for f in fields}, "patch_tokens": patch_tokens(vision_config)}
