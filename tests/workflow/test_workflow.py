"""The workflow as a whole: lint, formatting, job counts of dry runs, config errors, and a real run of the demo DAG."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow.conftest import REPO, job_counts, micro_config, run_snakemake

DEMO = ["--configfile", str(REPO / "config.demo.yaml"), "--replace-workflow-config"]
THESIS = ["--configfile", str(REPO / "config.yaml")]


def _grid_size(config_file):
    from hnclip.pipeline.grid import grid_cells

    return len(grid_cells(yaml.safe_load(config_file.read_text())["finetune"]["grid"]))


@pytest.mark.parametrize("config_args", [[], DEMO], ids=["thesis", "demo"])
def test_lint_is_clean(config_args):
    result = run_snakemake("--lint", *config_args)
    assert "Lints for" not in result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_check_is_clean():
    snakefmt = [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules/"]
    result = subprocess.run(snakefmt, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _expected_stage_counts(models: int, cells: int, demo: bool) -> dict[str, int]:
    counts = {
        "preprocess_hnc_train": 1,
        "preprocess_hnc_val": 1,
        "preprocess_hnc_test": 1,
        "preprocess_vqa": 2,
        "finetune": cells,
        "evaluate_encoder": models,
        "export": models,
        "vqa": models,  # one job per model answers both datasets
        "score_vqa": 2 * models,
    }
    counts.update({"synth": 1, "pretrain": 1} if demo else {"import_baseline": 1})
    return counts


def test_demo_dry_run_has_one_finetune_job_per_grid_cell(tmp_path):
    counts = job_counts(run_snakemake("-n", "--directory", str(tmp_path), *DEMO).stdout)
    cells = _grid_size(REPO / "config.demo.yaml")
    assert cells == 18
    for rule, expected in _expected_stage_counts(cells + 1, cells, demo=True).items():
        assert counts.get(rule) == expected, (rule, counts)
    assert "download" not in counts


def test_thesis_dry_run_downloads_and_has_one_finetune_job_per_grid_cell(tmp_path):
    counts = job_counts(run_snakemake("-n", "--directory", str(tmp_path), *THESIS).stdout)
    cells = _grid_size(REPO / "config.yaml")
    for rule, expected in _expected_stage_counts(cells + 1, cells, demo=False).items():
        assert counts.get(rule) == expected, (rule, counts)
    assert counts["download"] >= 10  # every raw input the thesis reads comes from the manifest


def test_adding_vqav2_testdev_plans_its_download_inference_and_submission(tmp_path):
    with_testdev = ["--config", 'llava={"datasets": ["vqav2", "textvqa", "vqav2_testdev"], "chunks": 1}']
    output = run_snakemake("-n", "--directory", str(tmp_path), *THESIS, *with_testdev).stdout
    counts = job_counts(output)
    models = _grid_size(REPO / "config.yaml") + 1
    assert counts["preprocess_vqa"] == 3
    assert counts["vqa"] == models  # the same jobs answer test-dev too
    assert counts["score_vqa"] == 2 * models  # no local score for test-dev ...
    assert counts["submit_vqa"] == models  # ... a submission file per model instead
    for entry in ("vqav2_test_questions", "coco_test2015_images"):
        assert f"wildcards: entry={entry}" in output
    assert "vqa/baseline/vqav2_testdev/submission.json" in output


def test_an_imported_evalai_score_becomes_an_input_of_the_summary(tmp_path):
    """What a user does after uploading: import the score, rerun; the summary then reads it (and only then)."""
    with_testdev = ["--config", 'llava={"datasets": ["vqav2", "textvqa", "vqav2_testdev"], "chunks": 1}']
    imported = tmp_path / "results/thesis/vqa/baseline/vqav2_testdev/evalai_scores.json"
    plan = run_snakemake("-n", "summary", "--directory", str(tmp_path), *THESIS, *with_testdev).stdout
    assert "evalai_scores.json" not in plan
    imported.parent.mkdir(parents=True)
    imported.write_text("{}")
    plan = run_snakemake("-n", "summary", "--directory", str(tmp_path), *THESIS, *with_testdev).stdout
    summary_inputs = plan.split("\nrule summary:", 1)[1].split("\n    output:", 1)[0]
    assert "results/thesis/vqa/baseline/vqav2_testdev/evalai_scores.json" in summary_inputs


def test_an_objective_set_for_every_cell_is_named_in_every_cell_path(tmp_path):
    """finetune.distillation_weight set once trains every cell with it: the cells get their own paths, beside the
    seed's-loss cells an earlier run may have trained, never over them."""
    output = run_snakemake("-n", "--directory", str(tmp_path), *DEMO, "--config",
                           "finetune={distillation_weight: 1.0, grid: {feature_anchor_weight: [0.0]}}").stdout
    cells = set(re.findall(r"wildcards: cell=(\S+)", output))
    assert len(cells) == 9 and all(cell.startswith("distillation_weight~1.0/alpha~") for cell in cells), cells


def test_vqav2_testdev_in_the_demo_is_a_config_error_naming_the_key(tmp_path):
    result = run_snakemake("-n", "--directory", str(tmp_path), *DEMO,
                           "--config", 'llava={"datasets": ["vqav2_testdev"]}', check=False)
    assert result.returncode != 0
    assert "config key llava.datasets: vqav2_testdev needs data_source: download" in result.stdout + result.stderr


def test_thesis_jobs_ask_for_the_memory_the_estimate_prints(tmp_path):
    from hnclip.pipeline.config import load_yaml, validate_config
    from hnclip.pipeline.estimate import job_mem_mb

    output = run_snakemake("-n", "--directory", str(tmp_path), *THESIS).stdout
    config = validate_config(load_yaml(REPO / "config.yaml"), base_dir=REPO)
    for rule, resource_key in (("finetune", "finetune"), ("evaluate_encoder", "evaluate"), ("export", "export"),
                               ("vqa", "vqa")):
        block = output.split(f"\nrule {rule}:", 1)[1].split("\n\n", 1)[0]
        asked = int(re.search(r"mem_mb=(\d+)", block)[1])
        assert asked == job_mem_mb(config, resource_key), rule


def _planned_files(dry_run_output: str) -> set[str]:
    """Every output, log and benchmark file of the jobs a dry run plans."""
    files = set()
    for match in re.finditer(r"^\s+(?:output|log|benchmark): (.+)$", dry_run_output, flags=re.MULTILINE):
        files.update(path.strip() for path in match[1].split(","))
    return files


def _simulate_finished_run(workdir: Path, files: set[str]) -> None:
    for path in files:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text("a finished run's file\n")


def test_demo_and_thesis_runs_in_one_checkout_plan_nothing_over_each_other(tmp_path):
    thesis = _planned_files(run_snakemake("-n", "--directory", str(tmp_path), *THESIS).stdout)
    demo = _planned_files(run_snakemake("-n", "--directory", str(tmp_path), *DEMO).stdout)
    assert len(thesis) > 100 and len(demo) > 100
    assert all(path.startswith(("results/thesis/", "resources/")) for path in thesis), sorted(thesis)[:5]
    assert all(path.startswith("results/demo/") for path in demo), sorted(demo)[:5]
    _simulate_finished_run(tmp_path, thesis)
    demo_after_thesis = _planned_files(run_snakemake("-n", "--directory", str(tmp_path), *DEMO).stdout)
    assert demo_after_thesis == demo and not demo_after_thesis & thesis
    _simulate_finished_run(tmp_path, demo)
    thesis_after_demo = _planned_files(run_snakemake("-n", "--directory", str(tmp_path), *THESIS).stdout)
    assert thesis_after_demo <= thesis and not thesis_after_demo & demo


def test_a_named_thesis_variant_runs_beside_the_thesis_and_shares_only_the_downloads(tmp_path):
    thesis = _planned_files(run_snakemake("-n", "--directory", str(tmp_path), *THESIS).stdout)
    _simulate_finished_run(tmp_path, thesis)
    variant = run_snakemake("-n", "--directory", str(tmp_path), *THESIS, "--config", "run_name=thesis-lr1e-5").stdout
    planned = _planned_files(variant)
    assert planned and all(path.startswith("results/thesis-lr1e-5/") for path in planned), sorted(planned)[:5]
    assert "download" not in job_counts(variant)  # the verified downloads are shared, not fetched again


def test_a_config_without_run_name_is_refused(tmp_path, write_config):
    config = yaml.safe_load((REPO / "config.demo.yaml").read_text())
    del config["run_name"]
    result = run_snakemake("-n", "--directory", str(tmp_path), "--configfile", str(write_config(config)),
                           "--replace-workflow-config", check=False)
    assert result.returncode != 0 and "'run_name' is a required property" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ({"finetune": {"grid": {"alpha": [0.0, -1.0], "tau": [0.05], "seed": [0]}}}, "finetune.grid.alpha[1]"),
        ({"finetune": {"grid": {"alpha": [0.0], "tau": [0.05], "seed": [0, 0]}}}, "finetune.grid.seed: duplicate"),
        ({"finetune": {"grid": {"alpha": [], "tau": [0.05], "seed": [0]}}}, "finetune.grid.alpha: must not be empty"),
        ({"finetune": {"grid": {"alpha": [1.0], "tau": [0.0], "seed": [0]}}}, "finetune.grid.tau[0]"),
        ({"paths": {"hnc_test": "nowhere/test.json"}}, "paths.hnc_test: nowhere/test.json does not exist"),
        ({"unknown_key": 1}, "'unknown_key' was unexpected"),
        ({"finetune": {"grid": {"alpha": [1.0], "tau": [0.05], "seed": [0], "feature_anchor_weight": [0.0, 1.0]},
                       "feature_anchor_weight": 0.5}},
         "finetune.feature_anchor_weight: is 0.5 and also swept by finetune.grid.feature_anchor_weight"),
        ({"finetune": {"grid": {"alpha": [1.0], "tau": [0.05], "seed": [0], "preference_mix": [0.5, 1.5]}}},
         "finetune.grid.preference_mix[1]"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, write_config, override, message):
    config = yaml.safe_load((REPO / "config.demo.yaml").read_text())
    for key, value in override.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    path = write_config(config, "bad.yaml")
    result = run_snakemake("--cores", "1", "--directory", str(tmp_path), "--configfile", str(path),
                           "--replace-workflow-config", check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()  # stopped before any job


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The whole demo DAG, shrunk, run for real in a temporary directory."""
    workdir = tmp_path_factory.mktemp("demo")
    config_path = workdir / "micro.yaml"
    config_path.write_text(yaml.safe_dump(micro_config()))
    args = ["--cores", "2", "--directory", str(workdir), "--configfile", str(config_path), "--replace-workflow-config"]
    result = run_snakemake(*args, timeout=1500, warm=True)
    return workdir, args, result


@pytest.mark.slow
def test_micro_demo_runs_every_stage(micro_run):
    workdir, _, _ = micro_run
    world = json.loads((workdir / "results/demo/synth/world.json").read_text())
    assert world  # the synthetic world in real formats
    for split in ["train", "val", "test"]:
        stats = json.loads((workdir / f"results/demo/data/hnc/{split}/stats.json").read_text())
        assert stats
    cells = ["alpha~0.0/tau~0.05/seed~0", "alpha~2.0/tau~0.05/seed~0"]
    for cell in cells:
        assert (workdir / f"results/demo/finetune/{cell}/model.safetensors").stat().st_size > 0
        provenance = json.loads((workdir / f"results/demo/finetune/{cell}/provenance.json").read_text())
        assert provenance["seed"] == 0 and provenance["git_commit"]
    for model in ["baseline", *cells]:
        hnc = json.loads((workdir / f"results/demo/eval/{model}/hnc.json").read_text())
        assert any(r["subset"] == "relation" for r in hnc["rows"])
    control_rows = json.loads((workdir / f"results/demo/eval/{cells[1]}/hnc.json").read_text())["rows"]
    assert all("delta_vs_control" in r and "delta_vs_baseline" in r for r in control_rows)
    # make demo's way: jobs forked from the warm server, logging to their own rule logs
    assert "in a child of the warm server" in (workdir / "results/demo/logs/finetune/alpha~2.0/tau~0.05/seed~0.log").read_text()
    for model in ["baseline", *cells]:
        for dataset in ["vqav2", "textvqa"]:
            scores = json.loads((workdir / f"results/demo/vqa/{model}/{dataset}/scores.json").read_text())
            assert scores["rows"][0]["subset"] == "all" and 0 <= scores["rows"][0]["value"] <= 1
        # the model's LLaVA is its tower alone, assembled with the demo's base at load
        stored = {p.name for p in (workdir / f"results/demo/llava/{model}").iterdir()} - {".snakemake_timestamp"}
        assert stored == {"vision_tower.safetensors", "llava_delta.json", "export.json"}
    summary = (workdir / "results/demo/tables/summary.csv").read_text().splitlines()
    assert summary[0].startswith("model,alpha,tau,seed,l2_sp_weight,distillation_weight,feature_anchor_weight,"
                                 "preference_mix,benchmark,subset,metric,value")
    for name in ["hnc_test.tex", "vqav2.md", "textvqa.csv"]:
        assert (workdir / "results/demo/tables" / name).stat().st_size > 0
    assert (workdir / "results/demo/figures/heatmap_hnc_relation.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_micro_demo_scores_every_compositionality_benchmark_and_finds_the_planted_leakage(micro_run):
    workdir, _, _ = micro_run
    demo = workdir / "results/demo"
    for model in ["baseline", "alpha~0.0/tau~0.05/seed~0", "alpha~2.0/tau~0.05/seed~0"]:
        for benchmark, metric in (("sugarcrepe", "accuracy"), ("aro", "accuracy"), ("winoground", "group_score")):
            rows = json.loads((demo / f"eval/{model}/{benchmark}.json").read_text())["rows"]
            assert any(r["metric"] == metric and 0 <= r["value"] <= 1 for r in rows), (model, benchmark)
    sugarcrepe = {r["subset"] for r in json.loads((demo / "eval/baseline/sugarcrepe.json").read_text())["rows"]}
    assert {"all", "replace", "swap", "add", "all@no_hnc_overlap"} <= sugarcrepe
    # the synthetic world planted images HNC trains on in every benchmark but Winoground; the report finds each
    planted = json.loads((demo / "synth/world.json").read_text())["counts"]["compositional"]["leakage_planted"]
    aro = json.loads((demo / "data/compositional/aro_leakage.json").read_text())["by_part"]
    captions_per_image = 5  # the order sets: every caption of a planted image overlaps
    assert aro["vg_relation"]["overlapping"] == planted["vg_relation"]
    assert aro["vg_attribution"]["overlapping"] == planted["vg_attribution"]
    assert aro["coco_order"]["overlapping"] == planted["coco_order"] * captions_per_image
    assert aro["flickr30k_order"]["overlapping"] == planted["flickr30k_order"] * captions_per_image
    sugar = json.loads((demo / "data/compositional/sugarcrepe_leakage.json").read_text())
    assert sugar["overlapping_items"] == planted["sugarcrepe"] > 0
    assert "| aro | vg_relation |" in (demo / "tables/leakage.md").read_text()
    for name in ["sugarcrepe.md", "aro.md", "winoground.md"]:
        assert (demo / "tables" / name).stat().st_size > 0
    assert (demo / "figures/compositional.pdf").read_bytes().startswith(b"%PDF")


def _file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_second_run_in_the_same_checkout_reproduces_the_summary_and_leaves_the_first_alone(micro_run):
    """The micro demo again under another run_name, beside the first: its own directory, the same numbers."""
    workdir, args, _ = micro_run
    first = _file_states(workdir / "results/demo")
    config = micro_config()
    config["run_name"] = "demo-again"
    again = workdir / "again.yaml"
    again.write_text(yaml.safe_dump(config))
    again_args = [arg if arg != str(workdir / "micro.yaml") else str(again) for arg in args]
    run_snakemake(*again_args, timeout=1500, warm=True)
    summary = "tables/summary.csv"
    assert (workdir / "results/demo-again" / summary).read_bytes() == (workdir / "results/demo" / summary).read_bytes()
    assert _file_states(workdir / "results/demo") == first


@pytest.mark.slow
def test_rerunning_one_cell_touches_no_other_cell(micro_run):
    workdir, args, _ = micro_run
    target = "results/demo/finetune/alpha~2.0/tau~0.05/seed~0/model.safetensors"
    counts = job_counts(run_snakemake(target, "--forcerun", "finetune", "-n", *args).stdout)
    assert counts == {"finetune": 1, "total": 1}
    assert "Nothing to be done" in run_snakemake("-n", *args).stdout + run_snakemake("-n", *args).stderr


@pytest.mark.slow
def test_editing_llava_settings_reruns_only_the_llava_stages(micro_run):
    workdir, args, _ = micro_run
    config = micro_config()
    config["llava"]["pretrain_steps"] += 1
    edited = workdir / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    edited_args = [arg if arg != str(workdir / "micro.yaml") else str(edited) for arg in args]
    counts = job_counts(run_snakemake("-n", *edited_args).stdout)
    models = 3  # baseline and the two micro cells
    assert {rule: counts.get(rule, 0) for rule in ("pretrain_llava", "export", "finetune", "evaluate_encoder")} == {
        "pretrain_llava": 1, "export": models, "finetune": 0, "evaluate_encoder": 0}
    config["llava"]["pretrain_steps"] -= 1
    config["llava"]["batch_size"] += 1  # inference only: the demo LLaVA stays, its answers are redone
    edited.write_text(yaml.safe_dump(config))
    counts = job_counts(run_snakemake("-n", *edited_args).stdout)
    # one VQA job per model answers both datasets
    assert counts.get("pretrain_llava", 0) == 0 and counts.get("export", 0) == 0 and counts["vqa"] == models


@pytest.mark.slow
def test_adding_an_objective_axis_trains_only_its_cells_and_compares_them_with_their_twins(micro_run):
    """The user's next step after a run: sweep a regulariser. The cells already trained are its 0 and stay; the
    anchored cells (and their alpha = 0 controls) train against a frozen baseline; the report pairs each with its
    twin."""
    workdir, args, _ = micro_run
    config = micro_config()
    config["finetune"]["grid"]["feature_anchor_weight"] = [0.0, 50.0]
    anchored = workdir / "anchored.yaml"
    anchored.write_text(yaml.safe_dump(config))
    anchored_args = [arg if arg != str(workdir / "micro.yaml") else str(anchored) for arg in args]
    counts = job_counts(run_snakemake("-n", *anchored_args).stdout)
    assert {rule: counts.get(rule, 0) for rule in ("finetune", "evaluate_encoder", "export", "vqa", "pretrain")} == {
        "finetune": 2, "evaluate_encoder": 2, "export": 2, "vqa": 2, "pretrain": 0}
    run_snakemake(*anchored_args, timeout=1500, warm=True)
    demo = workdir / "results/demo"
    log = pd.read_csv(demo / "finetune/feature_anchor_weight~50.0/alpha~2.0/tau~0.05/seed~0/train_log.csv")
    assert log["feature_anchor"].notna().all() and log["feature_anchor"].iloc[-1] > 0
    settings = json.loads((demo / "finetune/feature_anchor_weight~50.0/alpha~2.0/tau~0.05/seed~0/provenance.json")
                          .read_text())["settings"]
    assert settings["feature_anchor_weight"] == 50.0 and settings["alpha"] == 2.0
    effects = pd.read_csv(demo / "tables/objectives.csv")
    assert set(effects["setting"]) == {"feature_anchor_weight~50.0/alpha~0.0/tau~0.05",
                                       "feature_anchor_weight~50.0/alpha~2.0/tau~0.05"}
    assert set(effects["reference_setting"]) == {"alpha~0.0/tau~0.05", "alpha~2.0/tau~0.05"}
    assert {"HNC relation", "zero-shot top-1", "drift CKA", "VQA v2"} <= set(effects["measure"])
    assert (demo / "figures/objectives.pdf").read_bytes().startswith(b"%PDF")
    again = run_snakemake("-n", *anchored_args)
    assert "Nothing to be done" in again.stdout + again.stderr


# --config swallows every word after it: it goes last
REGENERATE = ["--rerun-triggers", "mtime", "--config", "report={from_existing: true}"]


@pytest.mark.slow
def test_regenerating_figures_touches_no_model_rule(micro_run):
    workdir, args, _ = micro_run
    for figure in (workdir / "results/demo/figures").iterdir():
        figure.unlink()
    counts = job_counts(run_snakemake("figures", "-n", *args, *REGENERATE).stdout)
    assert counts == {"figures": 1, "total": 1}
    run_snakemake("figures", *args, *REGENERATE)
    assert (workdir / "results/demo/figures/tradeoff.png").stat().st_size > 0


@pytest.mark.slow
def test_missing_cell_is_named_unless_partial_figures_are_asked_for(micro_run):
    workdir, args, _ = micro_run
    (workdir / "results/demo/eval/alpha~2.0/tau~0.05/seed~0/zeroshot.json").unlink()
    for table in (workdir / "results/demo/tables").iterdir():  # Snakemake does not rebuild a missing intermediate
        table.unlink()
    failed = run_snakemake("tables", *args, *REGENERATE, check=False)
    assert failed.returncode != 0
    assert "evaluate_encoder" not in failed.stdout  # the missing result is reported, not recomputed
    message = "missing results for 1 model × benchmark pair(s): alpha~2.0/tau~0.05/seed~0 (zeroshot)"
    assert message in (workdir / "results/demo/logs/summary/summary.log").read_text()
    partial = ["--rerun-triggers", "mtime", "--config", "report={from_existing: true, allow_partial: true}"]
    run_snakemake("tables", *args, *partial)
    assert "PARTIAL: 2 of 3 cells" in (workdir / "results/demo/tables/hnc_test.md").read_text()
