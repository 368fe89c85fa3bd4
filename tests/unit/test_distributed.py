"""Two gloo processes on the CPU give the same loss and gradients as one process on the same global batch."""

import pandas as pd
import pytest
import torch

from hnclip.models import create_clip
from hnclip.train.trainer import Trainer, TrainSettings
from tests.unit.gloo_ranks import run_two_ranks
from tests.unit.test_train import _settings, _write_pairs


def _loss_and_gradients(shard, state_dir, rank=0, world_size=1):
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip("hnclip-tiny")
    settings = TrainSettings(**_settings(batch_size=8, extra_random_negatives=2, hard_negatives_per_image=2))
    pairs = pd.read_parquet(shard)
    trainer = Trainer(settings, model, tokenizer, preprocess, pairs, None, state_dir)
    trainer.setup()
    features = trainer._encode_batch(trainer.batches.batch(0, rank, world_size))
    loss, _ = trainer._loss(features)
    loss.backward()
    from hnclip.train.distributed import average_gradients

    average_gradients(trainer.parameters)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_loss_and_gradients(rank, shard, tmp):
    return _loss_and_gradients(shard, f"{tmp}/state{rank}", rank, 2)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    shard = _write_pairs(tmp_path)
    single_loss, single_grads = _loss_and_gradients(shard, tmp_path / "single")
    for loss, grads in run_two_ranks(_rank_loss_and_gradients, tmp_path, shard, tmp_path):
        torch.testing.assert_close(loss, single_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == single_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], single_grads[name], rtol=1e-4, atol=1e-6, msg=name)
