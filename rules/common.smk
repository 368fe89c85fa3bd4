# Config validation, the grid, paths and input functions: every helper of the workflow lives here.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from hnclip.config import ConfigError, validate_config
from hnclip.grid import cell_path, grid_cells, parse_cell

try:
    config.update(validate_config(config, base_dir=workflow.basedir))
except ConfigError as error:
    raise WorkflowError(str(error)) from None


wildcard_constraints:
    model=r"baseline|alpha~[0-9.e+-]+/tau~[0-9.e+-]+/seed~[0-9]+",
    alpha=r"[0-9.e+-]+",
    tau=r"[0-9.e+-]+",
    seed=r"[0-9]+",
    split=r"train|val|test",
    dataset=r"vqav2|textvqa",
    chunk=r"[0-9]+",


SYNTH_DIR = "results/synth"
SYNTH_MARKER = f"{SYNTH_DIR}/world.json"

# Where each raw input lives in the synthetic world (same formats as the real files).
SYNTH_PATHS = {
    "gqa_images": f"{SYNTH_DIR}/gqa/images",
    "hnc_train": f"{SYNTH_DIR}/hnc/hnc_clean_strict_train.json",
    "hnc_val": f"{SYNTH_DIR}/hnc/hnc_clean_strict_val.json",
    "hnc_test": f"{SYNTH_DIR}/hnc/hnc_clean_strict_test.json",
    "vqav2_questions": f"{SYNTH_DIR}/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
    "vqav2_annotations": f"{SYNTH_DIR}/vqav2/v2_mscoco_val2014_annotations.json",
    "vqav2_images": f"{SYNTH_DIR}/vqav2/val2014",
    "textvqa_questions": f"{SYNTH_DIR}/textvqa/TextVQA_0.5.1_val.json",
    "textvqa_ocr": f"{SYNTH_DIR}/textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
    "textvqa_images": f"{SYNTH_DIR}/textvqa/train_images",
    "zeroshot": f"{SYNTH_DIR}/zeroshot",
}

# The demo LLaVA's training questions (the synthetic world's train splits).
SYNTH_LLAVA_TRAIN = {
    "vqav2": {
        "questions": f"{SYNTH_DIR}/vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
        "annotations": f"{SYNTH_DIR}/vqav2/v2_mscoco_train2014_annotations.json",
        "images": f"{SYNTH_DIR}/vqav2/train2014",
    },
    "textvqa": {
        "questions": f"{SYNTH_DIR}/textvqa/TextVQA_0.5.1_train.json",
        "ocr": f"{SYNTH_DIR}/textvqa/TextVQA_Rosetta_OCR_v0.2_train.json",
        "images": f"{SYNTH_DIR}/textvqa/train_images",
    },
}

IS_DEMO = config["data_source"] == "synth"
GRID = config["finetune"]["grid"]
CELLS = grid_cells(GRID["alpha"], GRID["tau"], GRID["seed"])
MODELS = ["baseline"] + CELLS


def raw_path(key):
    """The path of one raw input: the user's, the synthetic world's, or the download location."""
    if config["paths"][key] is not None:
        return config["paths"][key]
    if IS_DEMO:
        return SYNTH_PATHS[key]
    return DOWNLOAD_PATHS[key]


def raw_input(key):
    """What a rule waits for before reading a raw input (folders are signalled by a marker file)."""
    if config["paths"][key] is not None:
        return []
    if IS_DEMO:
        return SYNTH_MARKER
    return DOWNLOAD_MARKERS[key]


def scaled(rule_name, field):
    """A resource of ``rule_name`` that grows with the retry attempt (memory and runtime)."""
    base = {**config["resources"]["default"], **config["resources"].get(rule_name, {})}[field]
    return lambda wildcards, attempt: base * attempt


def resource(rule_name, field):
    return {**config["resources"]["default"], **config["resources"].get(rule_name, {})}[field]


def get_final_output():
    """Every target of a full run."""
    targets = []
    if IS_DEMO:
        targets.append(SYNTH_MARKER)
    return targets
