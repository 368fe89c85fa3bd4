"""Load and validate the pipeline's configuration before any job runs.

The JSON schema (config.schema.yaml) types, describes and defaults every key; this module fills the defaults,
turns schema errors into messages that name the config key, and adds the checks a schema cannot express
(paths that must exist).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from hnclip.pipeline.grid import effective_grid, swept_axes

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = REPO_ROOT / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def load_yaml(path: str | os.PathLike) -> dict:
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict:
    return load_yaml(path)


def _resolve_ref(schema: dict, root: dict) -> dict:
    """Follow a local ``$ref`` and merge the referring node's own keys (e.g. description) over it."""
    if "$ref" not in schema:
        return schema
    target: Any = root
    for part in schema["$ref"].lstrip("#/").split("/"):
        target = target[part]
    merged = dict(target)
    merged.update({k: v for k, v in schema.items() if k != "$ref"})
    return merged


def fill_defaults(config: dict, schema: dict, root: dict | None = None) -> dict:
    """Return a copy of ``config`` with every missing key set to its schema default, recursively."""
    root = root or schema
    filled = copy.deepcopy(config)
    for key, sub_schema in schema.get("properties", {}).items():
        sub_schema = _resolve_ref(sub_schema, root)
        if key not in filled and "default" in sub_schema:
            filled[key] = copy.deepcopy(sub_schema["default"])
        if isinstance(filled.get(key), dict) and "properties" in sub_schema:
            filled[key] = fill_defaults(filled[key], sub_schema, root)
    return filled


_BOOLEAN_WORDS = {"true": True, "false": False}


def _coerce_scalar(value: str, types: list[str]):
    """A string from ``--config`` (Snakemake reads nested values as plain strings) in the schema's type."""
    if "boolean" in types and value.lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value.lower()]
    for name, convert in (("integer", int), ("number", float)):
        if name in types:
            try:
                return convert(value)
            except ValueError:
                pass
    if "null" in types and value.lower() in ("null", "none", "~"):
        return None
    return value


def _schema_types(schema: dict, root: dict) -> list[str]:
    """The JSON types a value may take, through ``oneOf``/``anyOf`` branches too (``chunks: 2`` or ``auto``)."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        branch = _resolve_ref(branch, root)
        types += _schema_types(branch, root)  # a const branch ("auto") adds none: "2" is then tried as a number
    return types


def coerce_strings(config: dict, schema: dict, root: dict | None = None) -> dict:
    """Return ``config`` with string values turned into the booleans/numbers the schema asks for, recursively."""
    root = root or schema
    coerced = dict(config)
    for key, sub_schema in schema.get("properties", {}).items():
        if key not in coerced:
            continue
        sub_schema = _resolve_ref(sub_schema, root)
        types = _schema_types(sub_schema, root)
        value = coerced[key]
        if isinstance(value, dict) and "properties" in sub_schema:
            coerced[key] = coerce_strings(value, sub_schema, root)
        elif isinstance(value, str) and "string" not in types:
            coerced[key] = _coerce_scalar(value, types)
        elif isinstance(value, list) and isinstance(sub_schema.get("items"), dict):
            item_types = sub_schema["items"].get("type", [])
            item_types = [item_types] if isinstance(item_types, str) else list(item_types)
            if "string" not in item_types:
                coerced[key] = [_coerce_scalar(v, item_types) if isinstance(v, str) else v for v in value]
    return coerced


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"config key {key}: {error.message}; allowed keys: {', '.join(allowed)}"
    if error.validator == "uniqueItems":
        return f"config key {key}: duplicate grid values in {error.instance!r}"
    if error.validator == "minItems":
        return f"config key {key}: must not be empty (got {error.instance!r})"
    return f"config key {key}: {error.message}"


def validate_schema(config: dict, schema: dict) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))


def check_paths_exist(config: dict, base_dir: str | os.PathLike = ".") -> None:
    """Every path the user set must exist; null paths are produced by the workflow (synth or download)."""
    missing = []
    for key, value in config.get("paths", {}).items():
        if value is not None and not (Path(base_dir) / value).exists():
            missing.append(f"config key paths.{key}: {value} does not exist")
    if missing:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(missing))


# Datasets the synthetic world does not write: they need the real files.
REAL_DATA_ONLY_DATASETS = ("vqav2_testdev",)


def check_datasets_available(config: dict) -> None:
    """A dataset the data source cannot provide is a config error, not a missing file halfway through a run."""
    if config.get("data_source") != "synth":
        return
    unavailable = [d for d in config["llava"]["datasets"] if d in REAL_DATA_ONLY_DATASETS]
    if unavailable:
        raise ConfigError(f"invalid configuration:\n  config key llava.datasets: {', '.join(unavailable)} needs "
                          "data_source: download (the synthetic world has no VQA v2 test split)")


def check_objective_axes(config: dict) -> None:
    """An objective swept by the grid (some value not 0) is set there only: a finetune value beside it would be
    silently ignored by the swept cells and used by the axis's 0 cells."""
    finetune = config["finetune"]
    both = [axis for axis in swept_axes(finetune["grid"]) if finetune[axis] != 0]
    if both:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(
            f"config key finetune.{axis}: is {finetune[axis]} and also swept by finetune.grid.{axis}; set it in one "
            "place" for axis in both))


def objective_warnings(config: dict) -> list[str]:
    """What a valid config does that its author may not mean: with ``preference_mix`` 1 the contrastive loss has no
    weight, so cells that differ only in alpha train to the same weights; a feature anchor on features nothing
    trains."""
    finetune = config["finetune"]
    grid = effective_grid(finetune)
    warnings = []
    if 1.0 in grid["preference_mix"] and len(grid["alpha"]) > 1:
        warnings.append("finetune: preference_mix 1 gives the contrastive loss, and with it alpha, no weight: the cells "
                        f"with preference_mix 1 and alpha in {grid['alpha']} train to the same weights")
    frozen_penultimate = finetune["train_towers"] == "text" or finetune["train_last_n"] == 1
    if any(grid["feature_anchor_weight"]) and frozen_penultimate:
        warnings.append("finetune: the feature anchor holds penultimate features that cannot move (train_towers "
                        f"{finetune['train_towers']}, train_last_n {finetune['train_last_n']}): it only costs a "
                        "teacher pass")
    return warnings


GATED_BENCHMARKS = {"winoground": "facebook/winoground"}


def compositional_benchmarks(config: dict, token: str | None = None) -> tuple[list[str], list[str]]:
    """The compositionality benchmarks this run evaluates, and a message for each one it skips.

    A gated benchmark needs a Hugging Face token for its download (``token``; default: the user's, from
    ``HF_TOKEN`` or ``huggingface-cli login``) unless its data is given in ``paths``; without one, a real run skips
    it rather than failing at the download. The demo writes every benchmark itself.
    """
    wanted = list(config["evaluate"]["compositional"])
    if config["data_source"] == "synth":
        return wanted, []
    if token is None:
        import huggingface_hub

        token = huggingface_hub.get_token()
    skipped = [b for b in wanted if b in GATED_BENCHMARKS and not token and config["paths"].get(b) is None]
    messages = [f"{b} skipped: {GATED_BENCHMARKS[b]} is gated on the Hugging Face Hub. To evaluate it, accept its "
                f"terms at https://huggingface.co/datasets/{GATED_BENCHMARKS[b]}, then set HF_TOKEN (or run "
                f"`huggingface-cli login`), or point paths.{b} at a copy." for b in skipped]
    return [b for b in wanted if b not in skipped], messages


def validate_config(config: dict, schema: dict | None = None, base_dir: str | os.PathLike = ".") -> dict:
    """Fill defaults, validate against the schema and the path checks; return the completed config."""
    schema = schema if schema is not None else load_schema()
    completed = fill_defaults(coerce_strings(config, schema), schema)
    validate_schema(completed, schema)
    check_paths_exist(completed, base_dir)
    check_datasets_available(completed)
    check_objective_axes(completed)
    return completed
