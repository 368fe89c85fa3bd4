"""Resume state without pickle: tensors in safetensors, everything else in JSON.

The state holds the model, AdamW's moments and step counts, the RNG states and the data position (the step), which
is all a CPU run needs to continue bit-identically.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hnclip.io import atomic_path, write_json

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for name, value in per_param.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    for saved, live in zip(groups, current["param_groups"]):
        saved["params"] = live["params"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(state_dir: str | os.PathLike, model, optimizer, step: int, extra: dict | None = None) -> None:
    """Write the resume state; the JSON is written last, so a state without it is never trusted."""
    state_dir = Path(state_dir)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(optimizer))
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(state_dir / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    np_state = np.random.get_state()
    write_json(
        state_dir / STATE_META,
        {
            "step": step,
            "param_groups": groups,
            "python_random": _python_random_state(),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            **(extra or {}),
        },
    )


def load_state(state_dir: str | os.PathLike, model, optimizer) -> dict | None:
    """Restore model, optimizer and RNGs from ``state_dir``; returns the JSON metadata, or None if no state."""
    state_dir = Path(state_dir)
    meta_path = state_dir / STATE_META
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(state_dir / STATE_TENSORS))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    _restore_optimizer(optimizer, tensors, meta["param_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    numpy_state = meta["numpy_random"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
