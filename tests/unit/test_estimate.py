import math

import pytest
import torch

from hnclip.pipeline.config import REPO_ROOT, load_yaml, validate_config
from hnclip.pipeline.estimate import (
    Footprint,
    clip_shape,
    configured_mem_mb,
    finetune_footprint,
    footprints,
    format_estimate,
    job_mem_mb,
    llm_shape,
    stage_costs,
    vqa_chunks,
)


def _thesis(**changes) -> dict:
    config = validate_config(load_yaml(REPO_ROOT / "config.yaml"), base_dir=REPO_ROOT)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section] = {**config[section], key: value}
    return config


def test_thesis_estimate_counts_every_job_and_hours():
    config = _thesis()
    costs = {c.stage: c for c in stage_costs(config)}
    cells = 4 * 3 * 3
    assert costs["finetune"].jobs == cells and costs["evaluate_encoder"].jobs == cells + 1
    # micro-batches of 64 cost one more forward pass over the batch: a step is 4 passes instead of 3
    samples_per_s = config["estimate"]["finetune_samples_per_s"] * 3 / 4
    assert costs["finetune"].gpu_hours == pytest.approx(cells * (5000 * 256 / samples_per_s + 120) / 3600)
    # one VQA job per model answers both datasets: 20,000 VQA v2 + 5,000 TextVQA questions
    assert costs["vqa"].jobs == cells + 1 and costs["vqa"].items_per_job == 25000
    # HNC test, zero-shot and drift images, then SugarCrepe's COCO images, ARO's crops and order-set images, and
    # Winoground's image pairs
    assert costs["evaluate_encoder"].items_per_job == 11100 + 5000 + (23937 + 28748 + 5000 + 1000) + 800
    without = {c.stage: c for c in stage_costs(_thesis(evaluate__compositional=[]))}
    assert without["evaluate_encoder"].items_per_job == 11100
    table = format_estimate(list(costs.values()))
    assert table.splitlines()[-1].startswith("total")


def test_clip_parameter_counts_equal_the_built_models():
    from hnclip.models import create_clip

    for name in ("hnclip-tiny", "ViT-B-32"):
        model, _, _ = create_clip(name)
        shape = clip_shape(name)
        assert shape.vision_params == sum(p.numel() for p in model.visual.parameters()), name
        assert shape.params == sum(p.numel() for p in model.parameters()), name
    # counted once from the built ViT-L-14-336 (427,944,193 parameters; building it here takes 10 s and 2 GB)
    large = clip_shape("ViT-L-14-336-quickgelu")
    assert (large.vision_params, large.text_params, large.vision_tokens) == (304_293_888, 123_650_305, 577)


def test_llm_parameter_count_equals_a_built_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 3, "vocab_size": 500,
             "num_attention_heads": 4}
    for kv_heads in (4, 2):
        model = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=kv_heads, tie_word_embeddings=False))
        assert llm_shape({**shape, "num_key_value_heads": kv_heads}).params == sum(p.numel() for p in model.parameters())
    assert llm_shape({"vocab_size": 32064}).params == 6_738_939_904  # Vicuna-7B as llava-1.5-7b-hf ships it


def test_every_thesis_job_asks_for_at_least_its_estimate():
    config = _thesis()
    for stage in footprints(config):
        asked = configured_mem_mb(config, stage.rule)
        assert asked >= stage.host_mb, stage
        assert asked == job_mem_mb(config, stage.rule) == math.ceil(stage.host_mb * 1.3 / 1000) * 1000


def test_a_models_llava_needs_under_a_gigabyte_of_disk():
    stages = {s.rule: s for s in footprints(_thesis())}
    assert 600 < stages["export"].disk_mb < 1000  # ViT-L's tower in float16
    assert stages["export_full"].disk_mb > 13_000  # what each model cost before: the whole 7B checkpoint


def test_micro_batches_shrink_activations_by_the_batch_ratio():
    config, clip = _thesis(), clip_shape("ViT-L-14-336-quickgelu")
    whole = finetune_footprint(_thesis(finetune__micro_batch_size=None), clip).gpu_mb
    micro = finetune_footprint(config, clip).gpu_mb
    one = finetune_footprint(_thesis(finetune__micro_batch_size=1), clip).gpu_mb
    assert whole - micro == pytest.approx((256 - 64) * (micro - one) / 63)
    assert whole > 80_000 > micro  # batch 256 does not fit an 80 GB card whole; micro-batches of 64 do
    checkpointed = finetune_footprint(_thesis(finetune__micro_batch_size=None, finetune__grad_checkpointing=True),
                                      clip).gpu_mb
    assert checkpointed < 80_000


def test_the_estimate_warns_about_memory_a_job_does_not_ask_for():
    config = _thesis(finetune__micro_batch_size=None)
    config["resources"] = {**config["resources"], "vqa": {**config["resources"]["vqa"], "mem_mb": 4000}}
    table = format_estimate(stage_costs(config), footprints(config), config)
    assert "WARNING: resources.vqa.mem_mb 4000 < estimated" in table
    assert "WARNING: finetune needs 168 GB of GPU memory, over estimate.gpu_memory_gb 80" in table
    assert "WARNING" not in format_estimate(stage_costs(_thesis()), footprints(_thesis()), _thesis())
    for column in ("host GB", "mem_mb", "GPU GB", "disk GB"):
        assert column in table
    assert "peak of the whole run" in table


@pytest.mark.parametrize("chunks, runtime, expected", [(3, 240, 3), ("auto", 240, 1), ("auto", 20, 5)])
def test_vqa_jobs_are_split_only_when_one_would_pass_its_runtime(chunks, runtime, expected):
    config = _thesis(llava__chunks=chunks)
    config["resources"] = {**config["resources"], "vqa": {**config["resources"]["vqa"], "runtime": runtime}}
    assert vqa_chunks(config) == expected
    if chunks == "auto":  # each chunk's share of the questions, plus loading, fits 75 % of the runtime
        seconds = 25000 / config["estimate"]["vqa_questions_per_s"] / expected + config["estimate"]["model_load_s"]
        assert seconds <= 0.75 * runtime * 60


def test_a_runtime_shorter_than_loading_the_model_is_refused():
    config = _thesis()
    config["resources"] = {**config["resources"], "vqa": {**config["resources"]["vqa"], "runtime": 2}}
    with pytest.raises(ValueError, match="resources.vqa.runtime 2 min does not cover loading the model"):
        vqa_chunks(config)


def test_auto_memory_for_a_rule_without_an_estimate_is_refused():
    with pytest.raises(ValueError, match="resources.pretrain.mem_mb: auto has no memory estimate"):
        job_mem_mb(_thesis(), "pretrain")


def test_footprint_is_a_plain_record():
    assert Footprint("s", "r", 1, 1.0, 2.0, 3.0).note == ""
    assert torch.finfo(torch.float16).bits == 16  # the tower delta's dtype width the disk formula assumes


def test_a_frozen_teacher_costs_one_more_forward_pass_and_its_weights_and_patches_on_the_card():
    plain = _thesis()
    grid = {**plain["finetune"]["grid"], "feature_anchor_weight": [0.0, 10.0]}
    anchored = _thesis(finetune__grid=grid)
    costs = {c.stage: c for c in stage_costs(anchored)}
    cells = 4 * 3 * 3
    assert costs["finetune"].jobs == cells and costs["finetune + teacher"].jobs == cells
    # micro-batches: 4 passes a step; the teacher's forward of the batch makes 5
    assert costs["finetune + teacher"].items_per_s == pytest.approx(costs["finetune"].items_per_s * 4 / 5)
    assert costs["evaluate_encoder"].jobs == 2 * cells + 1
    clip = clip_shape(plain["model"]["clip_name"])
    extra = finetune_footprint(anchored, clip).gpu_mb - finetune_footprint(plain, clip).gpu_mb
    tokens = 256 * 577 * 1024  # the whole batch's ViT-L-14-336 tokens x width
    assert extra == pytest.approx((4 * clip.params + 8 * tokens * 4 + tokens * 2) / 1e6)
    l2_sp_only = _thesis(finetune__l2_sp_weight=0.1)  # L2-SP needs the starting weights only, no teacher pass
    assert [c.stage for c in stage_costs(l2_sp_only)][0] == "finetune"
    assert finetune_footprint(l2_sp_only, clip).gpu_mb == finetune_footprint(plain, clip).gpu_mb
