"""GPU-hours of a configured run, per stage, before anything is submitted.

Throughputs come from config (``estimate:``), to be replaced by what ``bench/train_step.py --device cuda
--real-size`` and ``bench/vqa_infer.py --device cuda --real-size`` measure on the cluster's GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def stage_costs(config: dict) -> list[StageCost]:
    """One line per GPU stage of the grid in ``config`` (a validated config with defaults filled)."""
    grid, estimate = config["finetune"]["grid"], config["estimate"]
    cells = len(grid["alpha"]) * len(grid["tau"]) * len(grid["seed"])
    models = cells + 1  # the baseline is evaluated like a cell
    vqa = config["preprocess"]["vqa_subsample"] or estimate["vqav2_questions"]
    questions = {"vqav2": vqa, "textvqa": estimate["textvqa_questions"]}
    load = estimate["model_load_s"]
    costs = [
        StageCost("finetune", cells, config["finetune"]["steps"] * config["finetune"]["batch_size"],
                  estimate["finetune_samples_per_s"], load),
        StageCost("evaluate_encoder", models, estimate["eval_images"], estimate["eval_images_per_s"], load),
    ]
    for dataset in config["llava"]["datasets"]:
        costs.append(StageCost(f"vqa ({dataset})", models, questions[dataset], estimate["vqa_questions_per_s"],
                               load * config["llava"]["chunks"]))
    return costs


def format_estimate(costs: list[StageCost]) -> str:
    lines = [f"{'stage':<18} {'jobs':>5} {'items/job':>10} {'items/s':>8} {'GPU-hours':>10}"]
    for cost in costs:
        lines.append(f"{cost.stage:<18} {cost.jobs:>5} {cost.items_per_job:>10} {cost.items_per_s:>8.0f} "
                     f"{cost.gpu_hours:>10.1f}")
    lines.append(f"{'total':<18} {sum(c.jobs for c in costs):>5} {'':>10} {'':>8} "
                 f"{sum(c.gpu_hours for c in costs):>10.1f}")
    return "\n".join(lines)
