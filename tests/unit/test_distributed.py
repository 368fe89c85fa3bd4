"""Two gloo processes on the CPU give the same loss and gradients as one process on the same global batch, with the
seed's loss and with the terms against the frozen baseline."""

import pandas as pd
import pytest
import torch

from hnclip.models import create_clip
from hnclip.train.trainer import Trainer, TrainSettings
from tests.unit.gloo_ranks import run_two_ranks
from tests.unit.test_train import _settings, _write_pairs

TEACHER_TERMS = {"distillation_weight": 1.0, "feature_anchor_weight": 5.0, "preference_mix": 0.5}


def _loss_and_gradients(shard, state_dir, rank=0, world_size=1, objectives=None):
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip("hnclip-tiny")
    settings = TrainSettings(**_settings(batch_size=8, extra_random_negatives=2, hard_negatives_per_image=2,
                                         **(objectives or {})))
    pairs = pd.read_parquet(shard)
    trainer = Trainer(settings, model, tokenizer, preprocess, pairs, None, state_dir)
    trainer.setup()
    with torch.no_grad():  # move the student off its teacher, so that every teacher term has a gradient
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    batch = trainer.batches.batch(0, rank, world_size)
    trainer._teacher_features = trainer._teach(batch)
    trainer._set_anchor_rank_share(batch)
    loss, _, _ = trainer._forward_backward(batch)
    from hnclip.train.distributed import average_gradients

    average_gradients(trainer.parameters)
    return torch.tensor(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_loss_and_gradients(rank, shard, tmp, objectives):
    return _loss_and_gradients(shard, f"{tmp}/state{rank}", rank, 2, objectives)


@pytest.mark.slow
@pytest.mark.parametrize("objectives", [{}, TEACHER_TERMS], ids=["seed-loss", "teacher-terms"])
def test_two_processes_match_one_process(tmp_path, objectives):
    shard = _write_pairs(tmp_path)
    single_loss, single_grads = _loss_and_gradients(shard, tmp_path / "single", objectives=objectives)
    ranks = run_two_ranks(_rank_loss_and_gradients, tmp_path, shard, tmp_path, objectives)
    # every rank computes the global contrastive, distillation and preference terms; the anchor is each rank's mean
    # over its own images, so the ranks' losses average to the single process's
    assert sum(float(loss) for loss, _ in ranks) / len(ranks) == pytest.approx(float(single_loss), rel=1e-6)
    for _, grads in ranks:
        assert grads.keys() == single_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], single_grads[name], rtol=1e-4, atol=1e-6, msg=name)
