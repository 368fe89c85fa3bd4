from hnclip.config import REPO_ROOT, load_yaml, validate_config
from hnclip.estimate import format_estimate, stage_costs


def test_thesis_estimate_counts_every_job_and_hours():
    config = validate_config(load_yaml(REPO_ROOT / "config.yaml"), base_dir=REPO_ROOT)
    costs = {c.stage: c for c in stage_costs(config)}
    cells = 4 * 3 * 3
    assert costs["finetune"].jobs == cells and costs["evaluate_encoder"].jobs == cells + 1
    finetune = costs["finetune"]
    expected = cells * (5000 * 256 / config["estimate"]["finetune_samples_per_s"] + 120) / 3600
    assert finetune.gpu_hours == expected
    assert costs["vqa (vqav2)"].items_per_job == 20000
    table = format_estimate(list(costs.values()))
    assert table.splitlines()[-1].startswith("total")
