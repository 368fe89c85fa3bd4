"""A model's LLaVA stored as what differs from the base: its vision tower alone, assembled with the base at load.

Swapping a fine-tuned tower into llava-1.5-7b changes 0.3 B of its 7 B parameters. A complete checkpoint per model is
14 GB, 0.5 TB for the thesis grid's 37 models; the tower in the base's float16 is 0.6 GB. ``export_tower_delta``
writes a folder holding

- ``vision_tower.safetensors``: the tower's tensors under the keys of LLaVA's ``vision_tower`` module, in the dtype
  the base stores its tower in;
- ``llava_delta.json``: the tower's vision config, the base's path and an identity of the base (the sha256 of its
  config and weight index, the size of each weight file) that ``load_llava`` checks before assembling.

``load_llava`` reads either a delta or any complete HF checkpoint. ``write_full_checkpoint`` turns a delta into a
complete checkpoint for users who load it elsewhere with ``from_pretrained``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hnclip.io import atomic_dir, write_json
from hnclip.llava.export import (
    TowerMismatchError,
    _check_preprocessing_matches,
    _copy_side_files,
    _merged_vision_config,
    _non_tower_digests,
    _tower_owner,
    _tower_summary,
    _verify_reloaded,
    check_tower_fits_llava,
    describe_tower,
    llava_tower_state_dict,
    to_hf_vision_model,
)

logger = logging.getLogger(__name__)

DELTA_FILE = "llava_delta.json"
TOWER_FILE = "vision_tower.safetensors"
DELTA_FORMAT = "hnclip-llava-tower-delta/1"
# A base checkpoint's tower keys are "vision_tower.<key>" (llava-hf's files) or "model.vision_tower.<key>"
# (transformers 5's save_pretrained): what follows the marker is the tower module's own key.
_TOWER_KEY_MARKER = "vision_tower."
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_BASE_INDEX_FILES = ("config.json", "model.safetensors.index.json")


class DeltaError(ValueError):
    """A tower delta cannot be assembled: its base is missing or is not the base it was exported against."""


# ----------------------------------------------------------------------------------------------------------------
# The base, read without loading it
# ----------------------------------------------------------------------------------------------------------------


def _weight_files(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise DeltaError(f"{base_dir} holds no *.safetensors weights: a tower delta needs a safetensors base")
    return files


def base_identity(base_dir: str | os.PathLike) -> dict[str, Any]:
    """What names a base checkpoint, read in milliseconds: the sha256 of its config and weight index and the size of
    every weight file (a 14 GB base is not read whole on every load; downloads are verified by their own sha256)."""
    base_dir = Path(base_dir)
    identity: dict[str, Any] = {"sha256": {}, "weight_bytes": {}}
    for name in _BASE_INDEX_FILES:
        if (base_dir / name).is_file():
            identity["sha256"][name] = hashlib.sha256((base_dir / name).read_bytes()).hexdigest()
    for path in _weight_files(base_dir):
        identity["weight_bytes"][path.name] = path.stat().st_size
    return identity


def base_tower_layout(base_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tower tensor of the base, from the safetensors headers (no weight is read)."""
    from safetensors import safe_open

    layout = {}
    for path in _weight_files(Path(base_dir)):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if _TOWER_KEY_MARKER not in key:
                    continue
                tensor = handle.get_slice(key)
                layout[key.split(_TOWER_KEY_MARKER, 1)[1]] = (tuple(tensor.get_shape()),
                                                              _SAFETENSORS_DTYPES[tensor.get_dtype()])
    if not layout:
        raise TowerMismatchError(f"{base_dir}: no tensor key contains {_TOWER_KEY_MARKER!r}; not a LLaVA checkpoint")
    return layout


def _layout_differences(base: dict[str, tuple], tower: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for label, keys in (("not replaced", sorted(set(base) - set(tower))), ("unexpected", sorted(set(tower) - set(base)))):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
    problems += [f"{k} {base[k][0]}->{tuple(v.shape)}" for k, v in sorted(tower.items())
                 if k in base and base[k][0] != tuple(v.shape)]
    return problems


def _single_dtype(layout: dict[str, tuple], base_dir: Path) -> torch.dtype:
    dtypes = {dtype for _, dtype in layout.values()}
    if len(dtypes) != 1:
        raise TowerMismatchError(f"{base_dir}: its tower mixes dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


# ----------------------------------------------------------------------------------------------------------------
# Writing a delta
# ----------------------------------------------------------------------------------------------------------------


def export_tower_delta(
    base_llava_dir: str | os.PathLike, open_clip_model: torch.nn.Module, out_dir: str | os.PathLike, *,
    tower_name: str = "open_clip",
) -> dict[str, Any]:
    """Write ``out_dir``: ``open_clip_model``'s tower converted for the base LLaVA, stored alone (see module doc).

    The base is read from its config and safetensors headers, never loaded: the tower must fit it (width, patch,
    resolution, depth, every tower key and shape) and is stored in the base tower's dtype. ``out_dir`` appears only
    once the written tensors read back bit for bit. Returns a summary for the caller's provenance record.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    base_llava_dir, out_dir = Path(base_llava_dir), Path(out_dir)
    hf_tower = to_hf_vision_model(open_clip_model)
    _check_preprocessing_matches(base_llava_dir, open_clip_model)
    llava_config = AutoConfig.from_pretrained(base_llava_dir)
    check_tower_fits_llava(hf_tower.config, llava_config, tower_name=tower_name)
    layout = base_tower_layout(base_llava_dir)
    dtype = _single_dtype(layout, base_llava_dir)
    tower = {k: v.to(dtype).contiguous() for k, v in llava_tower_state_dict(hf_tower).items()}
    problems = _layout_differences(layout, tower)
    if problems:
        raise TowerMismatchError(f"{tower_name} tower keys do not match {base_llava_dir}'s vision_tower: "
                                 f"{'; '.join(problems)}")
    vision_config = _merged_vision_config(llava_config.vision_config, hf_tower.config)
    if vision_config.hidden_act != llava_config.vision_config.hidden_act:
        # Legal (the activation travels with the tower), but OpenAI-weight towers built without QuickGELU land here.
        logger.warning("%s tower uses %s where the base LLaVA's tower used %s", tower_name, vision_config.hidden_act,
                       llava_config.vision_config.hidden_act)
    record = {
        "format": DELTA_FORMAT, "tower_name": tower_name, "base_dir": str(base_llava_dir),
        "base": base_identity(base_llava_dir), "dtype": str(dtype).removeprefix("torch."),
        "vision_config": vision_config.to_dict(),
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tower, str(tmp / TOWER_FILE), metadata={"format": DELTA_FORMAT})
        write_json(tmp / DELTA_FILE, record)
        _check_round_trip(tmp / TOWER_FILE, tower, load_file)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    logger.info("exported %s tower (%s) as a %.0f MB delta of %s", tower_name, describe_tower(hf_tower.config),
                sum(files.values()) / 1e6, base_llava_dir)
    return {
        "base_llava_dir": str(base_llava_dir), "out_dir": str(out_dir), "tower_name": tower_name,
        "tower": _tower_summary(hf_tower.config), "base_tower": _tower_summary(llava_config.vision_config),
        "dtype": record["dtype"], "tower_tensors": len(tower),
        "tower_parameters": int(sum(v.numel() for v in tower.values())), "files": files,
    }


def _check_round_trip(path: Path, expected: dict[str, torch.Tensor], load_file) -> None:
    from hnclip.llava.export import ExportVerificationError

    reloaded = load_file(str(path))
    differing = sorted(k for k in expected if k not in reloaded or not torch.equal(reloaded[k], expected[k]))
    if differing or set(reloaded) != set(expected):
        raise ExportVerificationError(f"{path} does not read back as written: {differing[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def is_tower_delta(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / DELTA_FILE).is_file()


def read_delta(delta_dir: str | os.PathLike) -> dict[str, Any]:
    record = json.loads((Path(delta_dir) / DELTA_FILE).read_text())
    if record.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{Path(delta_dir) / DELTA_FILE}: format {record.get('format')!r}, expected {DELTA_FORMAT!r}")
    return record


def base_of(delta_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """The base a delta is assembled with (``base_dir`` overrides the recorded path), checked to be that base."""
    record = read_delta(delta_dir)
    base = Path(base_dir if base_dir is not None else record["base_dir"])
    if not base.is_dir():
        raise DeltaError(f"{delta_dir} is a tower delta of {base}, which does not exist here; pass base_dir=, or "
                         f"build the complete checkpoint (rule export_full) where the base is")
    found = base_identity(base)
    if found != record["base"]:
        from hnclip.resume import fingerprint_differences

        differences = fingerprint_differences(record["base"], found)
        raise DeltaError(f"{delta_dir} was exported against another base than {base}: {'; '.join(differences[:5])}")
    return base


def files_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """Where a checkpoint's tokenizer, processor and chat template live: the base's folder for a delta."""
    return base_of(checkpoint_dir) if is_tower_delta(checkpoint_dir) else Path(checkpoint_dir)


def load_llava(checkpoint_dir: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
               base_dir: str | os.PathLike | None = None):
    """A ``LlavaForConditionalGeneration`` from a complete HF checkpoint or a tower delta (assembled with its base:
    the base's language model and projector, the delta's tower built from its own vision config)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPVisionConfig, LlavaForConditionalGeneration

    if not is_tower_delta(checkpoint_dir):
        return LlavaForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=dtype)
    base = base_of(checkpoint_dir, base_dir)
    config = AutoConfig.from_pretrained(base)
    config.vision_config = CLIPVisionConfig.from_dict(read_delta(checkpoint_dir)["vision_config"])
    model = LlavaForConditionalGeneration.from_pretrained(base, config=config, dtype=dtype)
    tower = _tower_owner(model).vision_tower
    tower.load_state_dict(load_file(str(Path(checkpoint_dir) / TOWER_FILE)), strict=True)
    return model


def write_full_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """A complete HF checkpoint of a delta (base files copied, tower replaced), proven by loading it back."""
    model = load_llava(checkpoint_dir)
    base = files_dir(checkpoint_dir)
    expected_tower = {k: v.detach().clone() for k, v in _tower_owner(model).vision_tower.state_dict().items()}
    expected_rest = _non_tower_digests(model)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        copied = _copy_side_files(base, tmp, {p.name for p in tmp.iterdir()})
        del model  # a 7B LLaVA twice in memory is 28 GB; the reload below only needs the digests
        gc.collect()
        _verify_reloaded(tmp, expected_tower, expected_rest)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    logger.info("wrote the complete checkpoint of %s into %s (%.1f GB)", checkpoint_dir, out_dir,
                sum(files.values()) / 1e9)
    return {"delta_dir": str(checkpoint_dir), "out_dir": str(out_dir), "copied_files": copied, "files": files}
