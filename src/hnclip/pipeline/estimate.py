"""What a configured run costs before anything is submitted: GPU-hours, and per stage the peak host memory, GPU memory
and disk of one job, plus the peak disk of the whole run.

Every figure is a formula of the config (grid, batch sizes, model shapes, question counts) and of the constants
below, each saying where it was measured or how it was derived. ``job_mem_mb`` turns the host-memory figure into
the ``mem_mb`` a rule asks SLURM for when the config says ``mem_mb: auto``, so the estimate and the jobs agree by
construction. ``vqa_chunks`` splits a model's VQA job only when one job would pass its runtime.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from hnclip.pipeline.grid import TEACHER_AXES, effective_grid, grid_cells, objectives_of

MB = 1e6

# ---- constants, each with its source ------------------------------------------------------------------------------
# RSS of a Python process that has imported torch, open_clip, transformers, pandas and hnclip (this repository's
# stack, measured on the 2-core development machine: 848 MB, 496 MB of it anonymous).
PROCESS_BASE_MB = 900.0
# Host bytes a fine-tune job holds per training pair (pair tables while reading the shards, then the pair index and
# uint16 caption tokens): bench/train_memory.py, 120 pairs per image, streamed images, growth of the process tree's
# anonymous memory from 48,000 to 192,000 pairs: 189 B/pair proportional, 400 B/pair RSS; rounded up to 600 because
# real captions are about twice as long as the bench's.
TRAIN_BYTES_PER_PAIR = 600.0
# A loader worker's own anonymous memory beyond what it shares with its parent (bench/train_memory.py, 2 workers).
LOADER_WORKER_MB = 150.0
# torch's DataLoader default prefetch_factor: batches in flight per worker, held in shared memory.
PREFETCH_BATCHES = 2
# Activation bytes a training step stores per token x width x layer x sample: Korthikanti et al. 2022 give 34 in half
# precision (the attention-score term dropped: SDPA never stores the scores); bf16 autocast keeps the residual stream
# in float32, hence 40. A derivation, not a measurement: bench/on_device.sh prints the measured peak on a GPU.
ACTIVATION_BYTES = 40.0
# With activation checkpointing a block keeps only its float32 input; one block's activations live during recompute.
CHECKPOINTED_BYTES = 4.0
# What CUDA's context, cuBLAS workspaces and the caching allocator's fragmentation take beyond the tensors.
CUDA_OVERHEAD_MB = 1500.0
# Parquet bytes per HNC pair in the shards: 30 measured on the rehearsal world (python -m hnclip.rehearsal), whose
# template captions compress better than real ones; doubled.
SHARD_BYTES_PER_PAIR = 60.0
# Headroom between the estimate and the memory a job asks for: allocator slack and glibc arenas.
MEM_HEADROOM = 1.3
# A VQA job is split into chunks when its estimated time passes this share of its runtime limit.
VQA_RUNTIME_SHARE = 0.75
# Prompt tokens of a VQA question beside the image tokens (system line, question, OCR line for TextVQA): the
# LLaVA-1.5 prompt with a long TextVQA OCR line is about 120 Llama tokens.
VQA_PROMPT_TOKENS = 120
# On disk after the download stage, in GB, from the publishers' stated sizes (archives deleted once extracted).
DOWNLOAD_GB = {
    "GQA images": 20.3, "HNC train/val/test JSON": 9.3, "COCO val2014 images": 6.6, "TextVQA train/val images": 7.1,
    "VQA v2 / TextVQA questions, OCR": 0.5, "CIFAR-100": 0.2, "CLIP ViT-L-14-336 (OpenAI)": 0.9,
    "llava-1.5-7b-hf": 14.1, "COCO val2017 images (SugarCrepe)": 0.8,
}
# Distinct images (or image crops) each compositionality benchmark encodes per model, from the published sets:
# SugarCrepe's pairs use at most COCO val2017's 5,000 images; ARO crops one Visual Genome region per VG-Relation
# (23,937) and VG-Attribution (28,748) item and scores the COCO (5,000) and Flickr30k (1,000) test images against
# their order perturbations; Winoground has two images per example (400). Captions cost a small share beside them.
COMPOSITIONAL_IMAGES = {"sugarcrepe": 5_000, "aro": 23_937 + 28_748 + 5_000 + 1_000, "winoground": 800}
# The largest archive that sits beside its extraction for a moment (GQA's images.zip).
LARGEST_ARCHIVE_GB = 21.8


# ---- model shapes ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipShape:
    vision_params: int
    text_params: int
    image_size: int
    vision_tokens: int
    vision_width: int
    vision_layers: int
    text_context: int
    text_width: int
    text_layers: int

    @property
    def params(self) -> int:
        return self.vision_params + self.text_params


def _transformer_params(width: int, layers: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    # attention in/out projections with biases, MLP with biases, two LayerNorms
    per_block = 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width
    return layers * per_block


def clip_shape(model_name: str) -> ClipShape:
    """Parameter counts and token shapes of an open_clip ViT CLIP from its config (exact for OpenAI-style ViTs:
    ViT-L-14-336 gives 304,293,888 + 123,650,305), without building the model."""
    import open_clip

    from hnclip.models import MODEL_CONFIG_DIR

    open_clip.add_model_config(MODEL_CONFIG_DIR)  # the repository's own model configs (the demo's tiny CLIP)
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"model.clip_name {model_name!r}: open_clip has no such model config")
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    size, patch, width = vision["image_size"], vision["patch_size"], vision["width"]
    tokens = (size // patch) ** 2 + 1
    vision_params = (3 * patch * patch * width + width + tokens * width + 4 * width + width * embed
                     + _transformer_params(width, vision["layers"], vision.get("mlp_ratio", 4.0)))
    t_width, context = text["width"], text["context_length"]
    text_params = (text["vocab_size"] * t_width + context * t_width + 2 * t_width + t_width * embed + 1
                   + _transformer_params(t_width, text["layers"], text.get("mlp_ratio", 4.0)))
    return ClipShape(vision_params, text_params, size, tokens, width, vision["layers"], context, t_width,
                     text["layers"])


@dataclass(frozen=True)
class LlmShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    kv_heads_ratio: float = 1.0  # key/value heads over attention heads (1 for Llama-2-7B)


# LlamaConfig's defaults: the shape of Llama-2-7B / Vicuna-7B, which llava-1.5-7b-hf's config leaves implicit.
_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000,
                   "num_attention_heads": 32}


def llm_shape(text_config: dict) -> LlmShape:
    c = {**_LLAMA_DEFAULTS, **{k: v for k, v in text_config.items() if k in _LLAMA_DEFAULTS or k ==
                                "num_key_value_heads"}}
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    kv_ratio = c.get("num_key_value_heads", c["num_attention_heads"]) / c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * int(h * h * kv_ratio) + 3 * h * c["intermediate_size"] + 2 * h
    return LlmShape(2 * vocab * h + layers * per_layer + h, h, layers, vocab, kv_ratio)


def llava_llm_shape(config: dict) -> LlmShape:
    """The LLaVA base's language model: read from its config.json when the base is on disk, else llava-1.5-7b-hf
    (Vicuna-7B: 6.74 B parameters, 32 layers of width 4096, 32,064 tokens)."""
    base = config["paths"].get("llava_base")
    config_file = Path(base) / "config.json" if base else None
    if config_file is not None and config_file.is_file():
        return llm_shape(json.loads(config_file.read_text()).get("text_config", {}))
    return llm_shape({"vocab_size": 32064})


# ---- GPU-hours ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCost:
    stage: str
    jobs: int
    items_per_job: int
    items_per_s: float
    overhead_s_per_job: float

    @property
    def gpu_hours(self) -> float:
        return self.jobs * (self.items_per_job / self.items_per_s + self.overhead_s_per_job) / 3600


def _cell_paths(config: dict) -> list[str]:
    return grid_cells(effective_grid(config["finetune"]))


def _cells(config: dict) -> int:
    return len(_cell_paths(config))


def _teacher_cells(config: dict) -> int:
    """Cells that train against a frozen copy of the baseline (hnclip.train.objectives)."""
    return sum(any(objectives_of(cell).get(axis, 0) > 0 for axis in TEACHER_AXES) for cell in _cell_paths(config))


def evaluation_images(config: dict) -> int:
    """Images one encoder evaluation encodes: HNC test, zero-shot and drift sets, and the compositionality
    benchmarks the run evaluates."""
    compositional = config["evaluate"]["compositional"]
    return config["estimate"]["eval_images"] + sum(COMPOSITIONAL_IMAGES.get(b, 0) for b in compositional)


def vqa_question_counts(config: dict) -> dict[str, int]:
    estimate = config["estimate"]
    vqav2 = config["preprocess"]["vqa_subsample"] or estimate["vqav2_questions"]
    counts = {"vqav2": vqav2, "textvqa": estimate["textvqa_questions"],
              "vqav2_testdev": estimate["vqav2_testdev_questions"]}
    return {dataset: counts[dataset] for dataset in config["llava"]["datasets"]}


def _vqa_model_seconds(config: dict) -> float:
    """One model's VQA time over every dataset, loading excluded."""
    return sum(vqa_question_counts(config).values()) / config["estimate"]["vqa_questions_per_s"]


def vqa_chunks(config: dict) -> int:
    """VQA jobs per model: the configured number, or (``auto``) the fewest whose estimated time each stays within
    ``VQA_RUNTIME_SHARE`` of ``resources.vqa.runtime`` (every job also loads the model)."""
    chunks = config["llava"]["chunks"]
    if chunks != "auto":
        return int(chunks)
    resources = rule_resources(config, "vqa")
    budget = resources.get("runtime", 240) * 60 * VQA_RUNTIME_SHARE - config["estimate"]["model_load_s"]
    if budget <= 0:
        raise ValueError(f"resources.vqa.runtime {resources.get('runtime')} min does not cover loading the model "
                         f"(estimate.model_load_s {config['estimate']['model_load_s']} s)")
    return max(1, math.ceil(_vqa_model_seconds(config) / budget))


def stage_costs(config: dict) -> list[StageCost]:
    """One line per GPU stage of the grid in ``config`` (a validated config with defaults filled)."""
    estimate, cells, finetune = config["estimate"], _cells(config), config["finetune"]
    models = cells + 1  # the baseline is evaluated like a cell
    load = estimate["model_load_s"]
    chunks = vqa_chunks(config)
    # micro-batches encode the batch once more without a graph; checkpointing recomputes each block's forward; a
    # frozen teacher encodes it once more (no graph, no backward)
    recomputes = bool(finetune["micro_batch_size"] and finetune["micro_batch_size"] < finetune["batch_size"]) \
        + bool(finetune["grad_checkpointing"])
    samples = finetune["steps"] * finetune["batch_size"]
    teacher_cells = _teacher_cells(config)
    finetune_lines = [
        StageCost(name, count, samples, estimate["finetune_samples_per_s"] * 3 / (3 + recomputes + extra), load)
        for name, count, extra in (("finetune", cells - teacher_cells, 0), ("finetune + teacher", teacher_cells, 1))
        if count  # a step is ~3 forward passes
    ]
    return [
        *finetune_lines,
        StageCost("evaluate_encoder", models, evaluation_images(config), estimate["eval_images_per_s"], load),
        StageCost("vqa", models * chunks, math.ceil(sum(vqa_question_counts(config).values()) / chunks),
                  estimate["vqa_questions_per_s"], load),
    ]


# ---- memory and disk ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """One job of a stage: peak host memory, peak GPU memory, and disk it leaves behind (all in MB)."""

    stage: str
    rule: str  # the config key under resources: whose mem_mb this covers
    jobs: int
    host_mb: float
    gpu_mb: float
    disk_mb: float
    note: str = ""


def rule_resources(config: dict, rule: str) -> dict:
    """A rule's resources: ``resources.default`` overridden by ``resources.<rule>`` (the workflow asks for these)."""
    return {**config["resources"].get("default", {}), **config["resources"].get(rule, {})}


def _loader_workers(config: dict, rule: str) -> int:
    from hnclip.loader import loader_workers_for

    resources = rule_resources(config, rule)
    return loader_workers_for(int(resources.get("threads", 1)), on_gpu=int(resources.get("gpu", 0)) > 0)


def _image_batch_mb(images: int, size: int) -> float:
    return images * 3 * size * size * 4 / MB


def _train_pairs(config: dict) -> int:
    return int(config["estimate"]["train_pairs"])


def _cached_train_images_mb(config: dict, clip: ClipShape) -> float:
    """Decoded training images the trainer keeps: all of them when they fit finetune.image_cache_mb, else none."""
    decoded = config["estimate"]["train_images"] * 3 * clip.image_size ** 2 * 4 / MB
    return decoded if decoded <= config["finetune"]["image_cache_mb"] * 2 ** 20 / MB else 0.0


def finetune_footprint(config: dict, clip: ClipShape) -> Footprint:
    f, gpus = config["finetune"], max(1, int(rule_resources(config, "finetune").get("gpu", 1)))
    per_rank = math.ceil(f["batch_size"] / gpus)
    graph_batch = min(per_rank, f["micro_batch_size"] or per_rank)
    captions = 1 + f["hard_negatives_per_image"] + f["extra_random_negatives"]
    per_token = CHECKPOINTED_BYTES if f["grad_checkpointing"] else ACTIVATION_BYTES
    vision = clip.vision_tokens * clip.vision_width * clip.vision_layers * per_token
    text = captions * clip.text_context * clip.text_width * clip.text_layers * per_token
    if f["grad_checkpointing"]:  # plus one block's full activations while it is recomputed
        vision += clip.vision_tokens * clip.vision_width * ACTIVATION_BYTES
        text += captions * clip.text_context * clip.text_width * ACTIVATION_BYTES
    trainable = {"both": clip.params, "vision": clip.vision_params, "text": clip.text_params}[f["train_towers"]]
    weights_optimizer = 16 * trainable + 4 * (clip.params - trainable)  # fp32 weights, grads, two Adam moments
    gpu = (weights_optimizer + graph_batch * (vision + text)) / MB + CUDA_OVERHEAD_MB
    teacher_cells = _teacher_cells(config)
    if teacher_cells:  # the frozen baseline's fp32 weights, its forward of the whole batch, its bf16 patches
        gpu += (4 * clip.params + _forward_only_bytes(per_rank, clip)
                + per_rank * clip.vision_tokens * clip.vision_width * 2) / MB
    workers = _loader_workers(config, "finetune")
    loader = workers * (LOADER_WORKER_MB + PREFETCH_BATCHES * _image_batch_mb(per_rank, clip.image_size))
    host = gpus * (PROCESS_BASE_MB + 2 * 4 * clip.params / MB + _train_pairs(config) * TRAIN_BYTES_PER_PAIR / MB
                   + _cached_train_images_mb(config, clip) + loader)
    state = 16 * trainable / MB  # weights and Adam moments of the resume state, while the cell runs
    teacher = f"; frozen teacher in {teacher_cells} cell(s)" if teacher_cells else ""
    return Footprint("finetune", "finetune", _cells(config), host, gpu, 4 * clip.params / MB,
                     f"per-rank batch {per_rank}, graph batch {graph_batch}{teacher}; +{state / 1e3:.1f} GB resume "
                     "state while running")


def _forward_only_bytes(images: int, clip: ClipShape) -> float:
    """A forward pass without a graph: one layer's activations at a time, a few float32 copies of the residual
    stream."""
    return 8 * images * clip.vision_tokens * clip.vision_width * 4


def evaluate_footprint(config: dict, clip: ClipShape) -> Footprint:
    batch = config["evaluate"]["batch_size"]
    workers = _loader_workers(config, "evaluate")
    host = (PROCESS_BASE_MB + 2 * 4 * clip.params / MB
            + workers * (LOADER_WORKER_MB + PREFETCH_BATCHES * _image_batch_mb(batch, clip.image_size)))
    gpu = (4 * clip.params + _forward_only_bytes(batch, clip)) / MB + CUDA_OVERHEAD_MB
    return Footprint("evaluate_encoder", "evaluate", _cells(config) + 1, host, gpu, 1.0)


def export_footprint(config: dict, clip: ClipShape) -> Footprint:
    # the open_clip model in float32, the converted tower beside it, the tower again in the base's float16
    host = PROCESS_BASE_MB + (4 * clip.params + 4 * clip.vision_params + 2 * clip.vision_params) / MB
    return Footprint("export (tower delta)", "export", _cells(config) + 1, host, 0.0, 2 * clip.vision_params / MB)


def vqa_footprint(config: dict, clip: ClipShape, llm: LlmShape) -> Footprint:
    llava = config["llava"]
    weights = 2 * (llm.params + clip.vision_params) / MB  # float16, as llava-1.5-7b-hf stores it
    tokens = (clip.vision_tokens - 1) + VQA_PROMPT_TOKENS + llava["max_new_tokens"]
    kv_cache = llava["batch_size"] * tokens * llm.layers * 2 * llm.hidden * llm.kv_heads_ratio * 2 / MB
    logits = llava["batch_size"] * llm.vocab * 4 * 2 / MB
    workers = _loader_workers(config, "vqa")
    host = PROCESS_BASE_MB + weights + workers * (
        LOADER_WORKER_MB + PREFETCH_BATCHES * _image_batch_mb(llava["batch_size"], clip.image_size))
    gpu = weights + kv_cache + logits + CUDA_OVERHEAD_MB
    chunks = vqa_chunks(config)
    return Footprint("vqa", "vqa", (_cells(config) + 1) * chunks, host, gpu, 20.0,
                     f"{chunks} job(s) per model, every dataset, model loaded once")


def export_full_footprint(config: dict, clip: ClipShape, llm: LlmShape) -> Footprint:
    weights = 2 * (llm.params + clip.vision_params) / MB
    # the assembled model, then its reload for verification (the first is freed before)
    return Footprint("export_full (on demand)", "export_full", 0, PROCESS_BASE_MB + 1.2 * weights, 0.0, weights,
                     "one target away, not part of the run")


def footprints(config: dict) -> list[Footprint]:
    clip = clip_shape(config["model"]["clip_name"])
    llm = llava_llm_shape(config)
    return [finetune_footprint(config, clip), evaluate_footprint(config, clip), export_footprint(config, clip),
            vqa_footprint(config, clip, llm), export_full_footprint(config, clip, llm)]


def shards_gb(config: dict) -> float:
    return _train_pairs(config) * SHARD_BYTES_PER_PAIR * 1.15 / 1e9  # train, plus val at a seventh of it


def peak_run_disk_gb(config: dict, stages: list[Footprint]) -> float:
    """Downloads (with the largest archive beside its extraction), shards, and every job's kept output."""
    kept = sum(s.jobs * s.disk_mb for s in stages) / 1e3
    return sum(DOWNLOAD_GB.values()) + LARGEST_ARCHIVE_GB + shards_gb(config) + kept


def job_mem_mb(config: dict, rule: str) -> int:
    """The ``mem_mb`` a rule asks for under ``mem_mb: auto``: its estimated peak host memory with headroom,
    rounded up to a GB."""
    for footprint in footprints(config):
        if footprint.rule == rule:
            return int(math.ceil(footprint.host_mb * MEM_HEADROOM / 1000) * 1000)
    raise ValueError(f"resources.{rule}.mem_mb: auto has no memory estimate; give a number")


def configured_mem_mb(config: dict, rule: str) -> int:
    value = rule_resources(config, rule).get("mem_mb", 2000)
    return job_mem_mb(config, rule) if value == "auto" else int(value)


# ---- printing -----------------------------------------------------------------------------------------------------
def format_estimate(costs: list[StageCost], stages: list[Footprint] | None = None, config: dict | None = None) -> str:
    lines = [f"{'stage':<18} {'jobs':>5} {'items/job':>10} {'items/s':>8} {'GPU-hours':>10}"]
    for cost in costs:
        lines.append(f"{cost.stage:<18} {cost.jobs:>5} {cost.items_per_job:>10} {cost.items_per_s:>8.0f} "
                     f"{cost.gpu_hours:>10.1f}")
    lines.append(f"{'total':<18} {sum(c.jobs for c in costs):>5} {'':>10} {'':>8} "
                 f"{sum(c.gpu_hours for c in costs):>10.1f}")
    if stages is None or config is None:
        return "\n".join(lines)
    lines += ["", f"{'per job':<24} {'jobs':>5} {'host GB':>8} {'mem_mb':>8} {'GPU GB':>7} {'disk GB':>8}  notes"]
    short = []
    for s in stages:
        mem_mb = configured_mem_mb(config, s.rule) if s.rule in config["resources"] or s.rule == "export_full" \
            else None
        flag = ""
        if mem_mb is not None and mem_mb < s.host_mb:
            flag = " !"
            short.append(f"resources.{s.rule}.mem_mb {mem_mb} < estimated {s.host_mb:.0f} MB")
        lines.append(f"{s.stage:<24} {s.jobs:>5} {s.host_mb / 1e3:>8.1f} {mem_mb or '':>8}{flag:<2}"
                     f"{s.gpu_mb / 1e3:>5.1f} {s.disk_mb / 1e3:>8.2f}  {s.note}")
    lines += ["", f"disk: downloads {sum(DOWNLOAD_GB.values()):.0f} GB (+{LARGEST_ARCHIVE_GB:.0f} GB while GQA's "
                  f"archive extracts), shards {shards_gb(config):.1f} GB, "
                  f"peak of the whole run {peak_run_disk_gb(config, stages):.0f} GB"]
    gpu_limit = config["estimate"]["gpu_memory_gb"]
    short += [f"{s.stage} needs {s.gpu_mb / 1e3:.0f} GB of GPU memory, over estimate.gpu_memory_gb {gpu_limit}: set "
              "finetune.micro_batch_size or finetune.grad_checkpointing" if s.rule == "finetune" else
              f"{s.stage} needs {s.gpu_mb / 1e3:.0f} GB of GPU memory, over estimate.gpu_memory_gb {gpu_limit}"
              for s in stages if s.gpu_mb / 1e3 > gpu_limit]
    lines += [f"WARNING: {message}" for message in short]
    return "\n".join(lines)
