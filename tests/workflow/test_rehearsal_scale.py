"""The scale rehearsal at two sizes: the stages that read many images hold no more memory at four times the images.

Each size runs the thesis rules (real file formats, GQA-size JPEGs, 336 px images) on the rehearsal world with the
tiny 336 px tower, for the one grid cell's fine-tune, the baseline's encoder evaluation and its VQA job. Peaks come
from the rules' logs (hnclip.memory: the job's whole process tree, loader workers included).
"""

import json

import pytest

from hnclip.pipeline.config import REPO_ROOT, load_yaml, validate_config
from hnclip.pipeline.estimate import clip_shape, finetune_footprint
from hnclip.rehearsal.run import RehearsalSettings, peak_memory_by_stage, rehearse

SMALL, LARGE = 0.002, 0.008
MODEL = "hnclip-tiny-336"
CELL = "alpha~1.0/tau~0.05/seed~0"
DECODED_IMAGE_MB = 3 * 336 * 336 * 4 / 1e6  # what each image would cost if a stage kept it
# What a stage's peak may move between two sizes without holding data (measured: VQA +18 MB for 330 more questions,
# evaluation +11 MB for 300 more images, with glibc's mmap threshold fixed (hnclip.memory.bound_heap_growth);
# without it its heap grew by 55 MB and 263 MB). A stage that kept its images would grow ten times faster.
NOISE_MB = 40.0


def _allowed_growth(extra_images: int) -> float:
    return NOISE_MB + 0.1 * extra_images * DECODED_IMAGE_MB


def _targets(run_name: str) -> list[str]:
    run = f"results/{run_name}"
    return [f"{run}/finetune/{CELL}/model.safetensors", f"{run}/eval/baseline/hnc.json",
            f"{run}/vqa/baseline/vqav2/chunk-0.jsonl"]


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rehearsal")
    runs = {}
    for fraction in (SMALL, LARGE):
        settings = RehearsalSettings(fraction, model=MODEL, steps=3, batch_size=8,
                                     vqa_questions=round(fraction * 50_000), cores=2,
                                     zeroshot_images=round(fraction * 50_000))
        report = rehearse(settings, targets=_targets(settings.run_name), workdir=workdir)
        run_dir = workdir / "results" / settings.run_name
        runs[fraction] = {
            "report": report,
            "peaks": peak_memory_by_stage(run_dir),
            "world": json.loads((run_dir / "inputs" / "world" / "world.json").read_text()),
            "config": load_yaml(run_dir / "config.yaml"),
            "zeroshot": sum(1 for _ in (run_dir / "inputs" / "zeroshot").rglob("*.jpg")),
        }
    return runs


def _growth(rehearsals, stage: str) -> float:
    return rehearsals[LARGE]["peaks"][stage]["pss_mb"] - rehearsals[SMALL]["peaks"][stage]["pss_mb"]


def _images(rehearsals, fraction: float, *keys: str) -> int:
    return sum(rehearsals[fraction]["world"]["counts"][key]["images"] for key in keys)


@pytest.mark.slow
def test_fine_tuning_memory_grows_with_the_pairs_only_never_with_the_images(rehearsals):
    more_images = _images(rehearsals, LARGE, "hnc_train") - _images(rehearsals, SMALL, "hnc_train")
    assert more_images * DECODED_IMAGE_MB > 500  # what holding the images would add: the test can fail
    clip = clip_shape(MODEL)
    estimates = [finetune_footprint(validate_config(rehearsals[f]["config"], base_dir=REPO_ROOT), clip).host_mb
                 for f in (SMALL, LARGE)]
    assert _growth(rehearsals, "finetune") < estimates[1] - estimates[0] + NOISE_MB


@pytest.mark.slow
def test_encoder_evaluation_memory_does_not_grow_with_the_images(rehearsals):
    more_images = rehearsals[LARGE]["zeroshot"] - rehearsals[SMALL]["zeroshot"]
    assert more_images * DECODED_IMAGE_MB > 2 * _allowed_growth(more_images)  # the test can fail
    assert _growth(rehearsals, "evaluate_encoder") < _allowed_growth(more_images)


@pytest.mark.slow
def test_vqa_memory_does_not_grow_with_the_questions(rehearsals):
    counts = {f: rehearsals[f]["world"]["counts"] for f in (SMALL, LARGE)}
    more_questions = sum(counts[LARGE][d]["questions"] - counts[SMALL][d]["questions"] for d in ("vqav2", "textvqa"))
    assert more_questions * DECODED_IMAGE_MB > 2 * _allowed_growth(more_questions)  # the test can fail
    assert _growth(rehearsals, "vqa") < _allowed_growth(more_questions)


@pytest.mark.slow
def test_the_rehearsal_prints_each_stage_beside_its_estimate_and_extrapolation(rehearsals):
    report = rehearsals[LARGE]["report"]
    assert "extrapolated MB" in report and "8,208,196 training pairs" in report
    for stage in ("finetune", "evaluate_encoder", "vqa", "export (tower delta)", "preprocess_hnc"):
        assert any(line.startswith(stage) for line in report.splitlines()), stage
