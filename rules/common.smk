# Config validation, the grid, paths and input functions: every helper of the workflow lives here.
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from hnclip.pipeline.config import ConfigError, validate_config
from hnclip.llava.prompt import prompt_variant
from hnclip.data.compositional import SUGARCREPE_CATEGORIES
from hnclip.pipeline.config import compositional_benchmarks, objective_warnings
from hnclip.pipeline.estimate import rule_resources, vqa_chunks
from hnclip.pipeline.grid import (
    CELL_WILDCARD,
    MODEL_WILDCARD,
    control_cell,
    effective_grid,
    grid_cells,
    parse_cell,
    unregularised_cell,
)

try:
    config.update(validate_config(config, base_dir=Path.cwd()))
except ConfigError as error:
    raise WorkflowError(str(error)) from None


wildcard_constraints:
    model=MODEL_WILDCARD,
    cell=CELL_WILDCARD,
    dataset=r"vqav2|textvqa|vqav2_testdev",
    chunk=r"[0-9]+",
    benchmark=r"sugarcrepe|aro|winoground",


# Everything one run writes (results, logs, benchmarks, resume state) lives under results/<run_name>/, so the
# demo, the thesis run and thesis variants share a checkout without planning over each other's files. Only the
# downloads under resources/ are shared: they are verified against the manifest, the same for every run.
RUN_DIR = f"results/{config['run_name']}"


def run_path(path):
    """``path`` inside this run's directory."""
    return f"{RUN_DIR}/{path}"


SYNTH_DIR = run_path("synth")
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
    "sugarcrepe": f"{SYNTH_DIR}/sugarcrepe",
    "coco_val2017_images": f"{SYNTH_DIR}/sugarcrepe/val2017",
    "aro_vg_relation": f"{SYNTH_DIR}/aro/visual_genome_relation.json",
    "aro_vg_attribution": f"{SYNTH_DIR}/aro/visual_genome_attribution.json",
    "aro_vg_images": f"{SYNTH_DIR}/aro/images",
    "coco_karpathy_test": f"{SYNTH_DIR}/aro/coco_karpathy_test.json",
    "coco_images": f"{SYNTH_DIR}/aro",
    "flickr30k_karpathy_test": f"{SYNTH_DIR}/aro/flickr30k_test.json",
    "flickr30k_images": f"{SYNTH_DIR}/aro",
    "winoground": f"{SYNTH_DIR}/winoground/data",
    "vg_image_data": f"{SYNTH_DIR}/vg/image_data.json",
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

# ---- real downloads (resources/manifest.yaml) --------------------------------------------------------------------
MANIFEST = "resources/manifest.yaml"
# config path key -> (manifest entry, where the entry puts it under resources/)
DOWNLOADS = {
    "gqa_images": ("gqa_images", "raw/gqa/images"),
    "hnc_train": ("hnc_train", "raw/hnc/hnc_clean_strict_train.json"),
    "hnc_val": ("hnc_val", "raw/hnc/hnc_clean_strict_val.json"),
    "hnc_test": ("hnc_test", "raw/hnc/hnc_clean_strict_test.json"),
    "vqav2_questions": (
        "vqav2_val_questions",
        "raw/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
    ),
    "vqav2_annotations": (
        "vqav2_val_annotations",
        "raw/vqav2/v2_mscoco_val2014_annotations.json",
    ),
    "vqav2_images": ("coco_val2014_images", "raw/vqav2/val2014"),
    "vqav2_testdev_questions": (
        "vqav2_test_questions",
        "raw/vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json",
    ),
    "vqav2_test_questions": (
        "vqav2_test_questions",
        "raw/vqav2/v2_OpenEnded_mscoco_test2015_questions.json",
    ),
    "vqav2_test_images": ("coco_test2015_images", "raw/vqav2/test2015"),
    "textvqa_questions": ("textvqa_val", "raw/textvqa/TextVQA_0.5.1_val.json"),
    "textvqa_ocr": (
        "textvqa_rosetta_ocr_val",
        "raw/textvqa/TextVQA_Rosetta_OCR_v0.2_val.json",
    ),
    "textvqa_images": ("textvqa_images", "raw/textvqa/train_images"),
    "zeroshot": ("cifar100", "raw/cifar100/cifar-100-python"),
    "clip_weights": (
        "clip_vit_l14_336_openai",
        "models/clip/ViT-L-14-336-openai/open_clip_model.safetensors",
    ),
    "llava_base": ("llava_1_5_7b_hf", "models/llava/llava-1.5-7b-hf"),
    "coco_val2017_images": ("coco_val2017_images", "raw/coco/val2017"),
    "aro_vg_relation": ("aro_vg_relation", "raw/aro/visual_genome_relation.json"),
    "aro_vg_attribution": (
        "aro_vg_attribution",
        "raw/aro/visual_genome_attribution.json",
    ),
    "aro_vg_images": ("aro_vg_images", "raw/aro/images"),
    "coco_karpathy_test": ("coco_karpathy_test", "raw/aro/coco_karpathy_test.json"),
    "coco_images": ("coco_val2014_images", "raw/vqav2"),
    "flickr30k_karpathy_test": (
        "flickr30k_karpathy_test",
        "raw/aro/flickr30k_test.json",
    ),
    "flickr30k_images": ("flickr30k_images", "raw/flickr30k"),
    "winoground": ("winoground_images", "raw/winoground/data"),
    "vg_image_data": ("vg_image_data", "raw/vg/image_data.json"),
}
# Inputs fetched by several manifest entries: every entry's marker is waited for.
MULTI_ENTRY_DOWNLOADS = {
    "sugarcrepe": (
        [f"sugarcrepe_{category}" for category in SUGARCREPE_CATEGORIES],
        "raw/sugarcrepe",
    ),
    "winoground": (["winoground_examples", "winoground_images"], "raw/winoground/data"),
}
DOWNLOAD_PATHS = {
    key: f"resources/{path}"
    for key, (_, path) in {**DOWNLOADS, **MULTI_ENTRY_DOWNLOADS}.items()
}
DOWNLOAD_MARKERS = {
    key: f"resources/.fetched/{entry}.json" for key, (entry, _) in DOWNLOADS.items()
}
DOWNLOAD_MARKERS.update(
    {
        key: [f"resources/.fetched/{entry}.json" for entry in entries]
        for key, (entries, _) in MULTI_ENTRY_DOWNLOADS.items()
    }
)

IS_DEMO = config["data_source"] == "synth"
# The compositionality benchmarks evaluated (a gated one is skipped, with a message, when no token can fetch it).
COMPOSITIONAL, COMPOSITIONAL_SKIPPED = compositional_benchmarks(config)
for message in COMPOSITIONAL_SKIPPED + objective_warnings(config):
    print(message, file=sys.stderr)
GRID = config["finetune"]["grid"]
CELLS = grid_cells(effective_grid(config["finetune"]))
MODELS = ["baseline"] + CELLS


def raw_path(key):
    """The path of one raw input: the user's, the synthetic world's, or the download location."""
    if config["paths"][key] is not None:
        return config["paths"][key]
    if IS_DEMO:
        return SYNTH_PATHS[key]
    return DOWNLOAD_PATHS[key]


def raw_input(key):
    """The file a job waits for before reading a raw input. It is the user's own file or folder, else the marker
    file of the job that makes it (the synthetic world, or the download of its manifest entry).
    """
    if config["paths"][key] is not None:
        return config["paths"][key]
    if IS_DEMO:
        return SYNTH_MARKER
    return DOWNLOAD_MARKERS[key]


# Memory and runtime grow with the retry attempt, so a job killed for either gets more the next time.
GROWS_WITH_ATTEMPT = ("mem_mb", "runtime")


def resource(rule_name, field):
    """``resources.<rule_name>.<field>`` over ``resources.default``. Memory and runtime grow with the attempt;
    ``mem_mb: auto`` is the stage's estimated peak host memory (hnclip.pipeline.estimate), worked out when a job
    is scheduled, not at every parse.
    """
    value = rule_resources(config, rule_name)[field]
    if field not in GROWS_WITH_ATTEMPT:
        return value
    if value == "auto":
        return lambda wildcards, attempt: estimated_mem_mb(rule_name) * attempt
    return lambda wildcards, attempt: value * attempt


def job_resources(rule_name, gpu=False):
    """A rule's ``resources:``: memory and runtime, and the GPU count for a rule that can run on one."""
    fields = ("mem_mb", "runtime", "gpu") if gpu else ("mem_mb", "runtime")
    return {field: resource(rule_name, field) for field in fields}


@functools.cache
def estimated_mem_mb(rule_name):
    from hnclip.pipeline.estimate import job_mem_mb

    return job_mem_mb(config, rule_name)


# ---- preprocess --------------------------------------------------------------------------------------------------
HNC_SPLITS = ["train", "val", "test"]


def hnc_shards(split):
    n_shards = config["preprocess"]["hnc_shards"][split]
    return [run_path(f"data/hnc/{split}/part-{k:05d}.parquet") for k in range(n_shards)]


VQA_INPUT_KEYS = {
    "vqav2": ["vqav2_questions", "vqav2_annotations", "vqav2_images"],
    "textvqa": ["textvqa_questions", "textvqa_ocr", "textvqa_images"],
    "vqav2_testdev": ["vqav2_testdev_questions", "vqav2_test_images"],
}


def vqa_raw_inputs(wildcards):
    return sorted({raw_input(key) for key in VQA_INPUT_KEYS[wildcards.dataset]})


def vqa_raw_paths(dataset):
    return {key.split("_", 1)[1]: raw_path(key) for key in VQA_INPUT_KEYS[dataset]}


# ---- models ------------------------------------------------------------------------------------------------------
BASELINE_WEIGHTS = run_path("baseline/model.safetensors")


def model_weights(model):
    """The CLIP weights file of a model name: the baseline or a grid cell."""
    if model == "baseline":
        return BASELINE_WEIGHTS
    return run_path(f"finetune/{model}/model.safetensors")


def finetune_settings(wildcards):
    """Plain Python values only: Snakemake compares params by their printed form."""
    f = config["finetune"]
    return dict(
        steps=f["steps"],
        batch_size=f["batch_size"],
        lr=f["lr"],
        weight_decay=f["weight_decay"],
        warmup_steps=f["warmup_steps"],
        grad_clip=f["grad_clip"],
        train_towers=f["train_towers"],
        hard_negatives_per_image=f["hard_negatives_per_image"],
        extra_random_negatives=f["extra_random_negatives"],
        val_every=f["val_every"],
        val_pairs=f["val_pairs"],
        checkpoint_every=f["checkpoint_every"],
        micro_batch_size=f["micro_batch_size"],
        grad_checkpointing=f["grad_checkpointing"],
        loss="hnc",
        **objective_settings(),
        **parse_cell(
            wildcards.cell
        ),  # alpha, tau, seed and the objective axes the cell names
    )


# The training settings beside the seed's loss, passed only when set: a run that uses none keeps the params (and so
# the results) it had before they existed. The objectives' weights (OBJECTIVE_AXES) come from the cell's path alone,
# which names every non-zero one (hnclip.pipeline.grid.effective_grid), so a path never trains other objectives
# than it names.
TRAINING_DEFAULTS = {
    "alpha_ramp_steps": 0,
    "train_last_n": None,
    "freeze_projections": False,
    "preference_beta": None,
}


def objective_settings():
    f = config["finetune"]
    return {
        key: f[key] for key, default in TRAINING_DEFAULTS.items() if f[key] != default
    }


LLAVA_TRAINING_KEYS = (
    "align_steps",
    "align_batch_size",
    "align_lr",
    "pretrain_steps",
    "pretrain_batch_size",
    "pretrain_lr",
    "pretrain_max_turns",
    "pretrain_ocr_fraction",
)


def llava_training_settings():
    """The demo LLaVA's training keys only: changing an inference setting must not retrain it."""
    return {key: config["llava"][key] for key in LLAVA_TRAINING_KEYS}


def pretrain_settings():
    p, f = config["pretrain"], config["finetune"]
    return dict(
        steps=p["steps"],
        batch_size=p["batch_size"],
        lr=p["lr"],
        tau=p["tau"],
        seed=p["seed"],
        loss="clip",
        warmup_steps=min(100, p["steps"] // 10),
        val_every=f["val_every"],
        val_pairs=f["val_pairs"],
        checkpoint_every=f["checkpoint_every"],
    )


# ---- evaluation ---------------------------------------------------------------------------------------------------
def comparison_models(model):
    """The models a result is compared with on the same items: the baseline and the alpha = 0 control."""
    if model == "baseline":
        return {}
    references = {"baseline": "baseline"}
    control = control_cell(model)
    if control != model:
        references["control"] = control
    return references


def eval_references(wildcards):
    """Per-item results of the comparison models: {benchmark: {name: Parquet path}}."""
    others = comparison_models(wildcards.model)
    return {
        benchmark: {
            name: run_path(f"eval/{other}/{benchmark}_items.parquet")
            for name, other in others.items()
        }
        for benchmark in ["hnc", "zeroshot"] + COMPOSITIONAL
    }


def eval_reference_files(wildcards):
    return [
        path for paths in eval_references(wildcards).values() for path in paths.values()
    ]


def eval_settings():
    e = config["evaluate"]
    return dict(
        batch_size=e["batch_size"], n_boot=e["n_boot"], seed=e["bootstrap_seed"]
    )


EVAL_BENCHMARKS = [
    "hnc",
    "zeroshot",
    "drift",
] + COMPOSITIONAL  # one evaluate_encoder job writes them all

# ---- compositionality benchmarks: raw inputs, and the item tables (with the leakage flag) every model reads
COMPOSITIONAL_INPUT_KEYS = {
    "sugarcrepe": ["sugarcrepe", "coco_val2017_images"],
    "aro": [
        "aro_vg_relation",
        "aro_vg_attribution",
        "aro_vg_images",
        "coco_karpathy_test",
        "coco_images",
        "flickr30k_karpathy_test",
        "flickr30k_images",
    ],
    "winoground": ["winoground"],
}


def compositional_raw_inputs(wildcards):
    keys = COMPOSITIONAL_INPUT_KEYS[wildcards.benchmark] + ["vg_image_data"]
    found = []
    for key in keys:
        value = raw_input(key)
        found += value if isinstance(value, list) else [value]
    return sorted(set(found))


def compositional_raw_paths(benchmark):
    keys = COMPOSITIONAL_INPUT_KEYS[benchmark] + ["vg_image_data"]
    return {key: raw_path(key) for key in keys}


def compositional_items(benchmark):
    return run_path(f"data/compositional/{benchmark}.parquet")


def compositional_eval_outputs():
    """evaluate_encoder's outputs for the compositionality benchmarks: results and per-item Parquet."""
    outputs = {}
    for benchmark in COMPOSITIONAL:
        outputs[benchmark] = run_path(f"eval/{{model}}/{benchmark}.json")
        outputs[f"{benchmark}_items"] = run_path(
            f"eval/{{model}}/{benchmark}_items.parquet"
        )
    return outputs


def eval_outputs(models=None):
    return [
        run_path(f"eval/{m}/{b}.json")
        for m in (models or MODELS)
        for b in EVAL_BENCHMARKS
    ]


# ---- LLaVA and VQA ------------------------------------------------------------------------------------------------
LLAVA_BASE = run_path("llava/base") if IS_DEMO else raw_path("llava_base")
VQA_DATASETS = config["llava"]["datasets"]
# Datasets scored here; test-dev's answers are not public: the EvalAI server scores its submission file.
SUBMITTED_VQA_DATASETS = [d for d in VQA_DATASETS if d == "vqav2_testdev"]
SCORED_VQA_DATASETS = [d for d in VQA_DATASETS if d not in SUBMITTED_VQA_DATASETS]
OCR_DATASETS = ["textvqa"] if config["llava"]["textvqa_ocr"] else []
# The prompt protocol of each dataset, a param of the VQA jobs: a change to it reruns them.
PROMPT_VARIANTS = {d: prompt_variant(d in OCR_DATASETS, d) for d in VQA_DATASETS}
VQA_CHUNKS = list(range(vqa_chunks(config)))


def llava_base_input():
    """The base LLaVA a tower is swapped into: the demo's own (trained here) or the downloaded llava-1.5-7b-hf."""
    return LLAVA_BASE if IS_DEMO else raw_input("llava_base")


def llava_checkpoint(model):
    return run_path(f"llava/{model}")


def vqa_chunk_files(wildcards):
    return [
        run_path(f"vqa/{wildcards.model}/{wildcards.dataset}/chunk-{k}.jsonl")
        for k in VQA_CHUNKS
    ]


def vqa_references(wildcards):
    """Per-question scores of the comparison models on the same questions."""
    return {
        name: run_path(f"vqa/{other}/{wildcards.dataset}/items.parquet")
        for name, other in comparison_models(wildcards.model).items()
    }


def vqa_outputs(models=None):
    """Per model: the scores of every scored dataset, the submission file of every submitted one."""
    models = models or MODELS
    return [
        run_path(f"vqa/{m}/{d}/scores.json")
        for m in models
        for d in SCORED_VQA_DATASETS
    ] + [
        run_path(f"vqa/{m}/{d}/submission.json")
        for m in models
        for d in SUBMITTED_VQA_DATASETS
    ]


def imported_scores():
    """EvalAI scores brought back with `python -m hnclip.llava.submission import-score` (read when present)."""
    if not SUBMITTED_VQA_DATASETS:
        return []
    from hnclip.llava.submission import imported_score_files

    return imported_score_files(
        p for p in vqa_outputs() if p.endswith("submission.json")
    )


def llava_train_paths(dataset):
    paths = SYNTH_LLAVA_TRAIN[dataset]
    return {
        "questions": paths["questions"],
        "annotations": paths.get("annotations"),
        "ocr": paths.get("ocr"),
        "images": paths["images"],
    }


# ---- aggregation ------------------------------------------------------------------------------------------------
BENCHMARKS = ["hnc_test", "zeroshot", "drift"] + COMPOSITIONAL + SCORED_VQA_DATASETS
# The objectives report compares each cell that adds an objective with its twin trained on the seed's loss alone:
# drawn when the grid holds such a pair (an objective axis that includes 0).
OBJECTIVES_COMPARED = any(unregularised_cell(cell) in CELLS for cell in CELLS)
TABLE_FILES = [
    run_path(f"tables/{b}.{ext}") for b in BENCHMARKS for ext in ["csv", "md", "tex"]
] + [
    run_path(f"tables/objectives.{ext}") for ext in ["csv", "md"] if OBJECTIVES_COMPARED
]
FIGURE_STEMS = [
    "heatmap_hnc_all",
    "heatmap_hnc_relation",
    "heatmap_zeroshot_top1",
    "heatmap_drift_cka",
    *[f"heatmap_{d}_accuracy" for d in SCORED_VQA_DATASETS],
    "type_groups",
    *(["compositional"] if COMPOSITIONAL else []),
    "tradeoff",
    *(["objectives"] if OBJECTIVES_COMPARED else []),
    "training_curves",
]


def result_files():
    """Every per-model result file the summary is built from (a submission file waits for its imported score)."""
    return eval_outputs() + [p for p in vqa_outputs() if p.endswith("scores.json")]


def summary_inputs(wildcards):
    """All result files, or (regenerating: report.from_existing) only those that exist, scheduling nothing; and
    the imported EvalAI scores there are."""
    imported = [ancient(path) for path in imported_scores()]
    if not config["report"]["from_existing"]:
        return result_files() + imported
    return [ancient(path) for path in result_files() if Path(path).exists()] + imported


def train_logs():
    return {cell: run_path(f"finetune/{cell}/train_log.csv") for cell in CELLS}


def train_log_inputs(wildcards):
    logs = list(train_logs().values())
    if config["report"]["from_existing"]:
        return [ancient(path) for path in logs if Path(path).exists()]
    return logs


def figure_files(stem):
    return [run_path(f"figures/{stem}.{ext}") for ext in ["pdf", "png"]]


# ---- what a run downloads ----------------------------------------------------------------------------------------
def run_raw_keys():
    """Every raw input this run reads: its datasets, benchmarks and weights, nothing it does not use."""
    keys = [
        "gqa_images",
        "hnc_train",
        "hnc_val",
        "hnc_test",
        "zeroshot",
        "clip_weights",
        "llava_base",
    ]
    for dataset in VQA_DATASETS:
        keys += VQA_INPUT_KEYS[dataset]
    keys += ["vqav2_test_questions"] if SUBMITTED_VQA_DATASETS else []
    for benchmark in COMPOSITIONAL:
        keys += COMPOSITIONAL_INPUT_KEYS[benchmark]
    keys += ["vg_image_data"] if COMPOSITIONAL else []
    return list(dict.fromkeys(keys))


def download_markers():
    """The download markers of the run's raw inputs that no config path provides."""
    markers = []
    for key in run_raw_keys():
        if config["paths"][key] is None:
            marker = DOWNLOAD_MARKERS[key]
            markers += marker if isinstance(marker, list) else [marker]
    return sorted(set(markers))


# ---- targets -----------------------------------------------------------------------------------------------------
def get_final_output():
    """Every target of a full run."""
    targets = []
    if IS_DEMO:
        targets.append(SYNTH_MARKER)
    targets += [run_path(f"data/hnc/{split}/stats.json") for split in HNC_SPLITS]
    targets += [run_path("tables/leakage.md")] if COMPOSITIONAL else []
    targets += expand(rules.preprocess_vqa.output[0], dataset=VQA_DATASETS)
    targets += [model_weights(model) for model in MODELS]
    targets += eval_outputs()
    targets += vqa_outputs()
    targets += [run_path("tables/summary.csv"), *TABLE_FILES]
    targets += [path for stem in FIGURE_STEMS for path in figure_files(stem)]
    return targets
