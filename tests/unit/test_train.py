"""The training recipe: batch plans, schedule, bit-identical resume after a kill, torchrun-equivalent gradients."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hnclip.train.data import BatchPlan, PairData
from hnclip.train.trainer import Trainer, TrainSettings, learning_rate, trainable_parameters

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def _write_pairs(root: Path, n_images: int = 24) -> Path:
    """Tiny images (two coloured squares) with one true and one swapped relation caption each."""
    rows = []
    names = list(COLOURS)
    for i in range(n_images):
        left, right = names[i % 4], names[(i // 4 + 1 + i % 4) % 4]
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        image.paste(COLOURS[left], (2, 10, 12, 20))
        image.paste(COLOURS[right], (20, 10, 30, 20))
        path = root / f"{i}.jpg"
        image.save(path)
        for k, (pos, neg) in enumerate(
            [(f"a {left} square left of a {right} square", f"a {right} square left of a {left} square"),
             (f"a {right} square right of a {left} square", f"a {left} square right of a {right} square")]
        ):
            rows.append(dict(image_id=str(i), image_path=str(path), positive=pos, negative=neg,
                             type="relation_obj", type_group="relation", positive_id=str(2 * k), negative_id=str(2 * k + 1)))
    shard = root / "part-00000.parquet"
    pd.DataFrame(rows).to_parquet(shard)
    return shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


def _settings(**overrides):
    base = dict(steps=12, batch_size=8, lr=1e-3, seed=3, tau=0.07, alpha=2.0, warmup_steps=2, val_every=6,
                val_pairs=16, checkpoint_every=3, extra_random_negatives=2)
    base.update(overrides)
    return base


def test_batch_plan_is_a_pure_function_of_seed_and_step(shard):
    data = PairData.from_pairs(pd.read_parquet(shard))
    plan, again = BatchPlan(data, 8, seed=1, k_hard=2, m_extra=3), BatchPlan(data, 8, seed=1, k_hard=2, m_extra=3)
    for step in [0, 1, 2, 5, 9]:
        images, positives, hard, extra = plan.rows(step)
        assert len(set(images)) == 8  # N distinct images
        for a, b in zip(plan.rows(step), again.rows(step)):
            np.testing.assert_array_equal(a, b)
        assert not (extra == positives[:, None]).any()
        for row, image in enumerate(images):  # every hard negative is one of the image's own negatives
            own = set(data.row_negative[data.image_rows[image]])
            assert set(hard[row]) <= own
    epoch = np.concatenate([plan.rows(s)[0] for s in range(plan.batches_per_epoch)])
    assert sorted(epoch) == list(range(24))  # one epoch visits every image once
    assert not np.array_equal(plan.rows(0)[0], BatchPlan(data, 8, seed=2).rows(0)[0])


def test_batch_plan_refuses_more_rows_than_images(shard):
    data = PairData.from_pairs(pd.read_parquet(shard))
    with pytest.raises(ValueError, match="finetune.batch_size=64 needs at least that many distinct images"):
        BatchPlan(data, 64, seed=0)


def test_learning_rate_warms_up_then_decays_to_zero():
    s = TrainSettings(**_settings(steps=10, lr=1.0, warmup_steps=2))
    assert [learning_rate(i, s) for i in (0, 1)] == [0.5, 1.0]
    assert learning_rate(2, s) == pytest.approx(1.0)
    assert learning_rate(6, s) == pytest.approx(0.5)
    assert learning_rate(10, s) == pytest.approx(0.0, abs=1e-12)


def test_vision_only_freezes_text_tower_and_temperature():
    from hnclip.models import create_clip

    model, _, _ = create_clip("hnclip-tiny")
    trainable = {id(p) for p in trainable_parameters(model, "vision")}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in trainable) == name.startswith("visual."), name


def _spec(shard, out: Path, loader: dict | None = None, **settings) -> Path:
    spec = dict(loader=loader,
        settings=_settings(**settings), model_name="hnclip-tiny", init_weights=None,
        train_shards=[str(shard)], val_shards=[str(shard)], state_dir=str(out / "state"),
        out_weights=str(out / "model.safetensors"), out_log=str(out / "train_log.csv"),
        out_provenance=str(out / "provenance.json"), config={"test": True}, device="cpu",
    )
    path = out / "spec.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return path


def _train(spec: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hnclip.train", str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for_state_step(state_dir: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        meta = state_dir / "state.json"
        if meta.exists():
            step = json.loads(meta.read_text())["step"]
            if step >= at_least:
                return step
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError("training made no progress")


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader, kill_after, objectives",
    [(None, 4, {}), ({"num_workers": 2, "image_cache_bytes": 0}, 7, {}),
     (None, 5, {"l2_sp_weight": 1.0, "alpha_ramp_steps": 8, "distillation_weight": 1.0,
                 "feature_anchor_weight": 1.0, "preference_mix": 0.5})],
    ids=["in-process", "workers", "objectives"])
def test_killed_and_resumed_run_ends_with_bit_identical_weights(shard, tmp_path, loader, kill_after, objectives):
    """With loader workers streaming the images from disk too: the straight run reads in its own process. With
    L2-SP and the teacher terms the resumed run must still compare with the weights the run started from, not the
    resumed ones."""
    straight = _train(_spec(shard, tmp_path / "straight", **objectives))
    interrupted = tmp_path / "interrupted"
    proc = _train(_spec(shard, interrupted, loader=loader, **objectives))
    # a hard kill (no chance to save) once a checkpointed step is reached; the rerun continues from the last state
    _wait_for_state_step(interrupted / "state", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "model.safetensors").exists()
    resumed = _train(_spec(shard, interrupted, loader=loader, **objectives))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    output = resumed.stdout.read()
    assert "resuming from" in output
    if loader:
        assert "read per batch by 2 loader workers" in output
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    a, b = load_file(tmp_path / "straight/model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = pd.read_csv(interrupted / "train_log.csv")
    assert log["step"].tolist() == list(range(1, 13))  # no duplicated or missing rows after the resume
    assert log["val_pairwise_accuracy"].notna().sum() == 2
    straight_log = pd.read_csv(tmp_path / "straight/train_log.csv")
    for column in ("l2_sp", "distillation", "feature_anchor", "preference", "alpha"):  # as if never interrupted
        pd.testing.assert_series_equal(log[column], straight_log[column])


@pytest.mark.slow
def test_sigterm_saves_state_and_the_rerun_finishes(shard, tmp_path):
    out = tmp_path / "term"
    proc = _train(_spec(shard, out, checkpoint_every=100))
    _wait_for_log_rows(out / "state" / "train_log.csv", 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "resume state saved" in output
    saved = json.loads((out / "state" / "state.json").read_text())["step"]
    assert 2 <= saved < 12
    rerun = _train(_spec(shard, out, checkpoint_every=100))
    assert rerun.wait(timeout=300) == 0
    assert pd.read_csv(out / "train_log.csv")["step"].tolist() == list(range(1, 13))


def _wait_for_log_rows(path: Path, rows: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError("no log rows")


def test_control_cell_skips_hard_negatives_without_changing_the_loss():
    """alpha = 0 does not encode hard negatives; its loss equals the full formula with alpha = 0."""
    from hnclip.losses import hnc_contrastive_loss

    torch.manual_seed(0)
    n, k, m, d = 6, 2, 3, 8
    image, text, hard, extra = torch.randn(n, d), torch.randn(n, d), torch.randn(n, k, d), torch.randn(n, m, d)
    ids = torch.arange(n)
    for extra_features in (extra, None):
        trainer = object.__new__(Trainer)
        trainer.settings = TrainSettings(**_settings(alpha=0.0))
        trainer._teacher_features = None  # no teacher term
        loss, parts = trainer._loss({"image": image, "text": text, "hard": None, "extra": extra_features, "ids": ids})
        expected = hnc_contrastive_loss(image, text, hard, alpha=0.0, tau=0.07, extra_negative_features=extra_features,
                                        image_ids=ids)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_encoding_captions_at_their_own_length_equals_encode_text():
    from hnclip.models import create_clip
    from hnclip.train.text import encode_text_by_length

    torch.manual_seed(0)
    model, _, tokenizer = create_clip("hnclip-tiny")
    model = model.double()
    captions = ["a red circle", "the blue square is to the left of the green triangle and above the red cross",
                "there are two circles", "either a gray diamond or a yellow cross is below the red square"]
    tokens = tokenizer(captions)
    weights = torch.randn(len(captions), 64, dtype=torch.double)
    expected = model.encode_text(tokens)
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trimmed = encode_text_by_length(model, tokens, edges=(6,))
    (trimmed * weights).sum().backward()
    torch.testing.assert_close(trimmed, expected, rtol=0, atol=1e-12)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=0, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Trainable parts and the objectives beside the seed's loss

def _trained(shard, tmp_path, steps: int = 4, **settings) -> tuple[dict, dict, list[dict]]:
    """Weights before and after ``steps`` steps of an in-process run, and the step records."""
    from hnclip.models import create_clip
    from hnclip.train.data import read_shards

    torch.manual_seed(0)
    clip, preprocess, tokenizer = create_clip("hnclip-tiny")
    before = {name: p.detach().clone() for name, p in clip.named_parameters()}
    trainer = Trainer(TrainSettings(**_settings(steps=steps, val_every=100, **settings)), clip, tokenizer, preprocess,
                      read_shards([shard]), None, tmp_path / "state", num_workers=0)
    trainer.setup()
    records = [trainer.step(step) for step in range(steps)]
    trainer.close_stream()
    return before, {name: p.detach().clone() for name, p in clip.named_parameters()}, records


def test_last_n_blocks_and_frozen_projections_leave_every_other_weight_bit_identical(shard, tmp_path):
    before, after, _ = _trained(shard, tmp_path, train_last_n=1, freeze_projections=True)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    last_vision = max(int(n.split(".")[3]) for n in before if n.startswith("visual.transformer.resblocks."))
    last_text = max(int(n.split(".")[2]) for n in before if n.startswith("transformer.resblocks."))
    allowed = (f"visual.transformer.resblocks.{last_vision}.", f"transformer.resblocks.{last_text}.", "visual.ln_post",
               "ln_final")
    assert changed and all(name.startswith(allowed) for name in changed), sorted(changed)
    assert torch.equal(before["visual.proj"], after["visual.proj"])
    assert torch.equal(before["text_projection"], after["text_projection"])


def test_last_n_of_one_warns_that_llava_reads_the_layer_below(caplog):
    from hnclip.models import create_clip

    model, _, _ = create_clip("hnclip-tiny")
    with caplog.at_level("WARNING"):
        trainable_parameters(model, "both", last_n=1)
    assert "LLaVA never reads" in caplog.text
    with pytest.raises(ValueError, match="train_last_n must be between 1 and"):
        trainable_parameters(model, "both", last_n=99)


def test_l2_sp_keeps_the_weights_nearer_their_start_and_is_logged_apart(shard, tmp_path):
    def distance(before, after):
        return sum(float((after[n] - before[n]).pow(2).sum()) for n in before if not n.startswith("logit_"))

    plain_before, plain_after, plain = _trained(shard, tmp_path / "plain")
    held_before, held_after, held = _trained(shard, tmp_path / "held", l2_sp_weight=100.0)
    assert distance(held_before, held_after) < distance(plain_before, plain_after)
    assert all(r["l2_sp"] == "" for r in plain) and all(isinstance(r["l2_sp"], float) for r in held)
    assert held[0]["l2_sp"] == 0.0 and held[-1]["l2_sp"] > 0  # zero at the start, then the distance grows


def test_alpha_ramps_over_the_first_steps(shard, tmp_path):
    _, _, records = _trained(shard, tmp_path, steps=4, alpha=2.0, alpha_ramp_steps=4)
    assert [r["alpha"] for r in records] == [0.5, 1.0, 1.5, 2.0]


def test_teacher_terms_start_from_the_students_own_values_and_are_logged_apart(shard, tmp_path):
    """At the first step the student is its teacher: no distillation, no anchor distance, a preference loss of
    log 2 (every margin equals the reference's). Then each grows, and the teacher's weights never move."""
    import math

    objectives = dict(distillation_weight=1.0, feature_anchor_weight=1.0, preference_mix=0.5)
    _, _, records = _trained(shard, tmp_path, **objectives)
    first = records[0]
    # in eval mode without a graph the teacher's attention takes PyTorch's fused inference kernel: equal to the
    # student's to float32 rounding, not bit for bit
    assert first["distillation"] == pytest.approx(0.0, abs=1e-6)
    assert first["feature_anchor"] == pytest.approx(0.0, abs=1e-9)
    assert first["preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["distillation"] > 0 and records[-1]["feature_anchor"] > 0
    assert records[-1]["preference"] != pytest.approx(math.log(2), abs=1e-6)
    _, _, plain = _trained(shard, tmp_path / "plain")
    assert all(r[term] == "" for r in plain for term in ("distillation", "feature_anchor", "preference"))


def test_the_teacher_is_a_frozen_copy_of_the_starting_weights(shard, tmp_path):
    from hnclip.models import create_clip
    from hnclip.train.data import read_shards

    torch.manual_seed(0)
    clip, preprocess, tokenizer = create_clip("hnclip-tiny")
    start = {name: p.detach().clone() for name, p in clip.named_parameters()}
    trainer = Trainer(TrainSettings(**_settings(steps=3, val_every=100, feature_anchor_weight=1.0)), clip, tokenizer,
                      preprocess, read_shards([shard]), None, tmp_path / "state", num_workers=0)
    trainer.setup()
    for step in range(3):
        trainer.step(step)
    trainer.close_stream()
    teacher = dict(trainer.teacher.named_parameters())
    assert all(not p.requires_grad for p in teacher.values())
    assert all(torch.equal(teacher[name], start[name]) for name in start)
    assert any(not torch.equal(p, start[name]) for name, p in clip.named_parameters())


def _penultimate_distance(shard, before: dict, after: dict) -> float:
    from hnclip.models import create_clip, penultimate_patch_tokens

    images = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(shard).parent / f"{i}.jpg"), dtype=np.float32))
                          .permute(2, 0, 1) / 255 for i in range(8)])
    tokens = []
    for weights in (before, after):
        model, _, _ = create_clip("hnclip-tiny")
        model.load_state_dict({**model.state_dict(), **weights})
        with torch.no_grad():
            tokens.append(penultimate_patch_tokens(model.eval(), images))
    return float((tokens[0] - tokens[1]).pow(2).mean())


def test_the_feature_anchor_keeps_the_penultimate_features_nearer_the_baseline(shard, tmp_path):
    plain_before, plain_after, _ = _trained(shard, tmp_path / "plain", steps=6)
    held_before, held_after, held = _trained(shard, tmp_path / "held", steps=6, feature_anchor_weight=1000.0)
    assert _penultimate_distance(shard, held_before, held_after) < 0.5 * _penultimate_distance(
        shard, plain_before, plain_after)


def test_teacher_terms_need_the_hnc_loss_and_a_mix_between_0_and_1():
    with pytest.raises(ValueError, match="preference_mix must lie in"):
        TrainSettings(**_settings(preference_mix=1.5))
    with pytest.raises(ValueError, match="need loss='hnc'"):
        TrainSettings(**_settings(loss="clip", distillation_weight=1.0))


@pytest.mark.parametrize("towers, moved, kept",
                         [("vision", "visual.", "transformer."), ("text", "transformer.", "visual.")])
def test_one_trained_tower_leaves_the_other_bit_identical(shard, tmp_path, towers, moved, kept):
    before, after, _ = _trained(shard, tmp_path, train_towers=towers)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(moved))
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(kept))
    assert torch.equal(before["logit_scale"], after["logit_scale"])


def test_training_the_text_tower_alone_warns_that_llava_sees_no_change(caplog):
    from hnclip.models import create_clip

    model, _, _ = create_clip("hnclip-tiny")
    with caplog.at_level("WARNING"):
        trained = trainable_parameters(model, "text")
    assert "LLaVA evaluation will see the baseline's features" in caplog.text
    assert trained and not any(p.requires_grad for p in model.visual.parameters())
    with pytest.raises(ValueError, match="train_towers must be one of both, vision, text"):
        trainable_parameters(model, "image")
