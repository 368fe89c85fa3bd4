"""GradCache micro-batching gives the whole batch's loss and parameter gradients exactly (float64, CPU), for every
shape of the HNC loss the trainer uses; activation checkpointing changes no gradient either."""

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import open_clip.transformer
from hnclip.losses import hnc_contrastive_loss, plain_clip_loss
from hnclip.models import create_clip
from hnclip.train import distributed
from hnclip.train.microbatch import micro_batched_backward, set_activation_checkpointing
from hnclip.train.text import encode_text_by_length
from tests.unit.gloo_ranks import run_two_ranks

ROWS = 6
TAU = 0.07
TIGHT = dict(rtol=1e-10, atol=1e-10)
WORDS = "a the red blue green yellow square circle left right of above below small large dog cat on near".split()


@dataclass
class Rows:
    images: torch.Tensor
    texts: torch.Tensor
    hard: torch.Tensor | None
    extra: torch.Tensor | None
    ids: torch.Tensor

    def local(self, start: int, stop: int) -> "Rows":
        pick = slice(start, stop)
        return Rows(self.images[pick], self.texts[pick], None if self.hard is None else self.hard[pick],
                    None if self.extra is None else self.extra[pick], self.ids[pick])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("hnclip-tiny")
    return model.double().train(), tokenizer


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def _random_captions(rng: np.random.Generator, count: int) -> list[str]:
    # 3 to 22 words: both sides of encode_text_by_length's 16-token bucket edge
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 23))) for _ in range(count)]


def _rows(tokenizer, *, k: int, m: int, alpha: float, repeated_ids: bool, seed: int = 1) -> Rows:
    """A random batch shaped like the trainer's: no hard negatives at alpha = 0 (it does not encode them)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    tokens = lambda count: tokenizer(_random_captions(rng, count))  # noqa: E731
    ids = [0, 1, 0, 2, 1, 3] if repeated_ids else list(range(ROWS))
    return Rows(
        images=torch.randn(ROWS, 3, 32, 32, generator=generator, dtype=torch.float64),
        texts=tokens(ROWS),
        hard=tokens(ROWS * k).reshape(ROWS, k, -1) if alpha > 0 else None,
        extra=tokens(ROWS * m).reshape(ROWS, m, -1) if m else None,
        ids=torch.tensor(ids),
    )


def _loss_function(alpha: float):
    """The trainer's ``_loss``: the HNC loss, random negatives only at alpha = 0, else the plain CLIP loss."""

    def loss_from_features(f: dict):
        common = dict(tau=TAU, image_ids=f["ids"], return_parts=True)
        if f["hard"] is not None:
            parts = hnc_contrastive_loss(f["image"], f["text"], f["hard"], alpha=alpha,
                                         extra_negative_features=f["extra"], **common)
        elif f["extra"] is not None:
            parts = hnc_contrastive_loss(f["image"], f["text"], f["extra"], alpha=1.0, **common)
        else:
            parts = plain_clip_loss(f["image"], f["text"], **common)
        return parts["loss"], parts

    return loss_from_features


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _whole_batch(model, rows: Rows, alpha: float):
    """The reference: one forward and backward over the whole batch, as ``Trainer.step`` does it."""
    n = rows.texts.shape[0]
    k = 0 if rows.hard is None else rows.hard.shape[1]
    m = 0 if rows.extra is None else rows.extra.shape[1]
    captions = [rows.texts] + [group.flatten(0, 1) for group in (rows.hard, rows.extra) if group is not None]
    text = encode_text_by_length(model, torch.cat(captions))
    features = {
        "image": model.encode_image(rows.images),
        "text": text[:n],
        "hard": text[n : n + n * k].reshape(n, k, -1) if k else None,
        "extra": text[n + n * k :].reshape(n, m, -1) if m else None,
        "ids": rows.ids,
    }
    loss, parts = _loss_function(alpha)(features)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {key: v.detach() if v is not None else None for key, v in features.items()}, _gradients(model)


def _micro_batched(model, rows: Rows, alpha: float, micro_batch_size: int, **options):
    model.zero_grad(set_to_none=True)
    result = micro_batched_backward(
        images=rows.images, texts=rows.texts, hard_negatives=rows.hard, extra_negatives=rows.extra,
        image_ids=rows.ids,
        encode_images=options.pop("encode_images", model.encode_image),
        encode_texts=options.pop("encode_texts", lambda tokens: encode_text_by_length(model, tokens)),
        loss_from_features=_loss_function(alpha), micro_batch_size=micro_batch_size, **options,
    )
    return result, _gradients(model)


def _assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **TIGHT, msg=name)


def _assert_both_towers_learn(gradients: dict) -> None:
    # guards against a vacuous comparison: both towers receive a real gradient
    assert any(name.startswith("visual.") and g.abs().max() > 1e-6 for name, g in gradients.items())
    assert any(name.startswith("transformer.") and g.abs().max() > 1e-6 for name, g in gradients.items())


CASES = {  # alpha, K, M, repeated image ids, micro-batch size (the batch has 6 rows)
    "alpha0-plain-divides": (0.0, 1, 0, False, 2),
    "alpha0-extra-does-not-divide": (0.0, 1, 2, False, 4),
    "alpha0-repeated-ids-does-not-divide": (0.0, 1, 0, True, 5),
    "alpha-K1-does-not-divide": (1.5, 1, 0, False, 4),
    "alpha-K3-extra-divides": (2.0, 3, 2, False, 3),
    "alpha-K2-extra-repeated-ids": (2.0, 2, 1, True, 4),
    "micro-batch-of-one-row": (2.0, 2, 2, True, 1),
    "micro-batch-larger-than-batch": (2.0, 2, 2, False, 64),
}


@pytest.mark.parametrize("alpha, k, m, repeated_ids, micro_batch_size", CASES.values(), ids=CASES.keys())
def test_micro_batches_give_the_whole_batch_loss_and_gradients(tiny, model, alpha, k, m, repeated_ids,
                                                                micro_batch_size):
    rows = _rows(tiny[1], k=k, m=m, alpha=alpha, repeated_ids=repeated_ids)
    loss, features, expected = _whole_batch(model, rows, alpha)
    result, gradients = _micro_batched(model, rows, alpha, micro_batch_size)

    _assert_both_towers_learn(expected)
    _assert_same_gradients(gradients, expected)
    torch.testing.assert_close(result.loss, loss, **TIGHT)
    torch.testing.assert_close(result.parts["image_to_text"] + result.parts["text_to_image"], loss, **TIGHT)
    assert not result.loss.requires_grad
    for key, value in features.items():
        if value is None:
            assert result.features[key] is None, key
        else:
            torch.testing.assert_close(result.features[key], value, **TIGHT, msg=key)
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.parametrize("micro_batch_size", [1, 4, 6])
def test_an_image_penalty_joins_the_whole_batch_gradient(tiny, model, micro_batch_size):
    """The feature anchor's shape: a mean over rows of each image's penultimate patches against fixed ones."""
    from hnclip.models import encode_image_with_patches
    from hnclip.regularisers import feature_anchor

    rows = _rows(tiny[1], k=2, m=1, alpha=2.0, repeated_ids=False)
    with torch.no_grad():
        reference = encode_image_with_patches(model, rows.images + 0.5)[1]  # what the rows are pulled towards
    weight = 3.0
    _, _, contrastive_only = _whole_batch(model, rows, 2.0)
    model.zero_grad(set_to_none=True)
    _, patches = encode_image_with_patches(model, rows.images)
    whole_penalty = weight * feature_anchor(patches, reference)
    whole_penalty.backward()
    penalty_only = _gradients(model)
    expected = {name: g + penalty_only.get(name, torch.zeros_like(g)) for name, g in contrastive_only.items()}

    def share(side, micro_rows):
        return weight * feature_anchor(side, reference[micro_rows]) * (side.shape[0] / ROWS)

    result, gradients = _micro_batched(model, rows, 2.0, micro_batch_size,
                                       encode_images=lambda images: encode_image_with_patches(model, images),
                                       image_penalty=share)
    _assert_same_gradients(gradients, expected)
    torch.testing.assert_close(result.penalty, whole_penalty.detach(), **TIGHT)
    assert whole_penalty.item() > 0.1 and not result.penalty.requires_grad


def test_gradients_accumulate_like_backward(tiny, model):
    rows = _rows(tiny[1], k=2, m=1, alpha=2.0, repeated_ids=False)
    _, _, once = _whole_batch(model, rows, 2.0)
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # no zero_grad in between: gradients add up, as two loss.backward() calls would
        micro_batched_backward(
            images=rows.images, texts=rows.texts, hard_negatives=rows.hard, extra_negatives=rows.extra,
            image_ids=rows.ids, encode_images=model.encode_image,
            encode_texts=lambda tokens: encode_text_by_length(model, tokens),
            loss_from_features=_loss_function(2.0), micro_batch_size=4,
        )
    _assert_same_gradients(_gradients(model), {name: 2 * g for name, g in once.items()})


def test_a_frozen_tower_is_re_encoded_once_only(tiny, model):
    for name, parameter in model.named_parameters():  # train_towers="vision"
        parameter.requires_grad_(name.startswith("visual."))
    rows = _rows(tiny[1], k=2, m=1, alpha=2.0, repeated_ids=True)
    _, _, expected = _whole_batch(model, rows, 2.0)
    calls = []

    def encode_texts(tokens):
        calls.append(torch.is_grad_enabled())
        return encode_text_by_length(model, tokens)

    _, gradients = _micro_batched(model, rows, 2.0, 2, encode_texts=encode_texts)
    _assert_same_gradients(gradients, expected)
    assert expected and all(name.startswith("visual.") for name in expected)
    assert calls == [False, False, False, True]  # three cached micro-batches, then one try with a graph


class DropoutTowers(torch.nn.Module):
    """Two toy towers with dropout: only an exact RNG replay makes the second pass see the first pass's masks."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(12, 8, dtype=torch.float64)
        self.token = torch.nn.Embedding(64, 8, dtype=torch.float64)
        self.dropout = torch.nn.Dropout(0.5)

    def encode_image(self, images):
        return self.dropout(self.image(images))

    def encode_text(self, tokens):
        return self.dropout(self.token(tokens).mean(dim=1))


def _dropout_rows() -> Rows:
    generator = torch.Generator().manual_seed(5)
    tokens = lambda *shape: torch.randint(0, 64, (*shape, 7), generator=generator)  # noqa: E731
    return Rows(torch.randn(ROWS, 12, generator=generator, dtype=torch.float64), tokens(ROWS),
                tokens(ROWS, 2), tokens(ROWS, 1), torch.arange(ROWS))


def _dropout_reference(towers: DropoutTowers, rows: Rows, micro_batch_size: int) -> dict:
    """One graph over the batch encoded micro-batch by micro-batch, images then captions, like the cached pass."""
    parts = {"image": [], "text": [], "hard": [], "extra": []}
    for start in range(0, ROWS, micro_batch_size):
        piece = rows.local(start, min(start + micro_batch_size, ROWS))
        b = piece.texts.shape[0]
        parts["image"].append(towers.encode_image(piece.images))
        text = towers.encode_text(torch.cat([piece.texts, piece.hard.flatten(0, 1), piece.extra.flatten(0, 1)]))
        parts["text"].append(text[:b])
        parts["hard"].append(text[b : 3 * b].reshape(b, 2, -1))
        parts["extra"].append(text[3 * b :].reshape(b, 1, -1))
    features = {key: torch.cat(value) for key, value in parts.items()} | {"ids": rows.ids}
    loss, _ = _loss_function(2.0)(features)
    loss.backward()
    return _gradients(towers)


def test_dropout_masks_are_replayed_exactly():
    torch.manual_seed(0)
    towers, rows = DropoutTowers(), _dropout_rows()
    torch.manual_seed(123)
    expected = _dropout_reference(towers, rows, micro_batch_size=4)
    state_after_reference = torch.get_rng_state()
    towers.zero_grad(set_to_none=True)
    other_masks = _dropout_reference(towers, rows, micro_batch_size=4)  # the generator has moved on
    assert not torch.allclose(other_masks["image.weight"], expected["image.weight"])  # dropout does matter

    torch.manual_seed(123)
    _, gradients = _micro_batched(towers, rows, 2.0, 4, encode_images=towers.encode_image,
                                  encode_texts=towers.encode_text)
    _assert_same_gradients(gradients, expected)
    assert torch.equal(torch.get_rng_state(), state_after_reference)  # the generator ends where one pass leaves it


def test_forward_passes_run_in_the_given_context(tiny, model):
    """The trainer's bf16 autocast reaches every forward pass; bf16 only allows a loose comparison."""
    model = model.float()
    rows = _rows(tiny[1], k=2, m=1, alpha=2.0, repeated_ids=True)
    rows.images = rows.images.float()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with bf16():
        loss, _, expected = _whole_batch(model, rows, 2.0)
    result, gradients = _micro_batched(model, rows, 2.0, 4, forward_context=bf16)
    assert all(result.features[key].dtype == torch.bfloat16 for key in ("image", "text", "hard", "extra"))
    torch.testing.assert_close(result.loss, loss, rtol=1e-2, atol=0)
    difference = sum(((gradients[name] - expected[name]) ** 2).sum() for name in expected) ** 0.5
    assert difference < 0.05 * sum((g**2).sum() for g in expected.values()) ** 0.5


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_refuses_a_micro_batch_size_below_one(size):
    def never(_):
        raise AssertionError("nothing may be encoded before the arguments are checked")

    rows = _dropout_rows()
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        micro_batched_backward(images=rows.images, texts=rows.texts, hard_negatives=rows.hard,
                               extra_negatives=rows.extra, image_ids=rows.ids, encode_images=never,
                               encode_texts=never, loss_from_features=never, micro_batch_size=size)


def test_refuses_rows_that_do_not_line_up():
    rows = _dropout_rows()
    with pytest.raises(ValueError, match="must have the 6 rows of texts"):
        micro_batched_backward(images=rows.images[:5], texts=rows.texts, hard_negatives=None, extra_negatives=None,
                               image_ids=rows.ids, encode_images=None, encode_texts=None, loss_from_features=None,
                               micro_batch_size=2)


# ---- activation checkpointing ----------------------------------------------------------------------------------------
def test_activation_checkpointing_covers_both_towers(tiny, model, monkeypatch):
    set_activation_checkpointing(model)
    checkpointed = []
    original = open_clip.transformer.checkpoint

    def counting_checkpoint(block, *args, **kwargs):
        checkpointed.append(block)
        return original(block, *args, **kwargs)

    monkeypatch.setattr(open_clip.transformer, "checkpoint", counting_checkpoint)
    rows = _rows(tiny[1], k=1, m=0, alpha=1.0, repeated_ids=False)
    model.encode_image(rows.images)
    assert len(checkpointed) == len(model.visual.transformer.resblocks)
    checkpointed.clear()
    encode_text_by_length(model, rows.texts)  # the trainer's text path, not encode_text
    assert len(checkpointed) >= len(model.transformer.resblocks)
    assert set(checkpointed) <= set(model.transformer.resblocks)

    set_activation_checkpointing(model, enabled=False)
    checkpointed.clear()
    model.encode_image(rows.images)
    encode_text_by_length(model, rows.texts)
    assert checkpointed == []


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_activation_checkpointing_changes_no_gradient(tiny, model, micro_batch_size):
    rows = _rows(tiny[1], k=2, m=2, alpha=2.0, repeated_ids=True)
    loss, _, expected = _whole_batch(model, rows, 2.0)
    set_activation_checkpointing(model)
    if micro_batch_size is None:
        checkpointed_loss, _, gradients = _whole_batch(model, rows, 2.0)
    else:
        result, gradients = _micro_batched(model, rows, 2.0, micro_batch_size)
        checkpointed_loss = result.loss
    _assert_both_towers_learn(expected)
    _assert_same_gradients(gradients, expected)
    torch.testing.assert_close(checkpointed_loss, loss, **TIGHT)


def test_activation_checkpointing_needs_an_open_clip_model():
    with pytest.raises(TypeError, match="needs an open_clip model"):
        set_activation_checkpointing(torch.nn.Linear(2, 2))


# ---- torchrun: two gloo ranks ----------------------------------------------------------------------------------------
def _rank_micro_batched(rank: int):
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("hnclip-tiny")
    model = model.double().train()
    rows = _rows(tokenizer, k=2, m=1, alpha=2.0, repeated_ids=True).local(3 * rank, 3 * rank + 3)
    result, _ = _micro_batched(model, rows, 2.0, micro_batch_size=2)  # 3 local rows: does not divide
    distributed.average_gradients([p for p in model.parameters() if p.requires_grad])
    return result.loss, _gradients(model)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_whole_batch_gradients(tiny, model, tmp_path):
    rows = _rows(tiny[1], k=2, m=1, alpha=2.0, repeated_ids=True)
    loss, _, expected = _whole_batch(model, rows, 2.0)
    for rank_loss, rank_gradients in run_two_ranks(_rank_micro_batched, tmp_path):
        torch.testing.assert_close(rank_loss, loss, **TIGHT)
        _assert_same_gradients(rank_gradients, expected)


# ---- in the trainer ------------------------------------------------------------------------------------------------
TEACHER_CASES = {
    "distillation-anchor-preference": {"distillation_weight": 1.0, "feature_anchor_weight": 5.0, "preference_mix": 0.5},
    "preference-alone-at-alpha-0": {"preference_mix": 1.0},
}


@pytest.mark.parametrize("alpha, micro_batch_size, objectives",
                         [(0.0, 3, {}), (2.0, 3, {}), (2.0, 5, {}),
                          (2.0, 3, TEACHER_CASES["distillation-anchor-preference"]),
                          (0.0, 5, TEACHER_CASES["preference-alone-at-alpha-0"])],
                         ids=["alpha0", "alpha2", "alpha2-mb5", *TEACHER_CASES])
def test_the_trainer_with_micro_batches_matches_its_whole_batch_gradient(tmp_path, alpha, micro_batch_size,
                                                                          objectives):
    """The trainer's own batch (hard negatives only when alpha > 0 or the preference loss ranks them, extra
    negatives, its loss and the teacher terms) through both paths. The student is moved off its teacher first, so
    that distillation and the anchor have a gradient to compare."""
    from tests.unit.test_train import _settings, _write_pairs
    from hnclip.train.data import read_shards
    from hnclip.train.trainer import Trainer, TrainSettings

    shard = _write_pairs(tmp_path)
    pairs = read_shards([shard])
    gradients = {}
    for size in (None, micro_batch_size):
        torch.manual_seed(0)
        clip, preprocess, tokenizer = create_clip("hnclip-tiny")
        settings = TrainSettings(**_settings(alpha=alpha, hard_negatives_per_image=2, micro_batch_size=size,
                                             **objectives))
        trainer = Trainer(settings, clip, tokenizer, preprocess, pairs, None, tmp_path / f"state-{size}")
        trainer.setup()
        with torch.no_grad():
            for parameter in clip.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        trainer.optimizer.zero_grad(set_to_none=True)
        batch = trainer._batch(0)
        trainer._teacher_features = trainer._teach(batch)
        loss, parts, features = trainer._forward_backward(batch)
        trainer.close_stream()
        assert (features["hard"] is not None) == (alpha > 0 or "preference_mix" in objectives)
        for term in ("distillation", "feature_anchor", "preference"):
            assert (term in parts) == (f"{term}_weight" in objectives or f"{term}_mix" in objectives), term
            assert term not in parts or float(parts[term]) > 1e-4, term  # a term that is zero compares nothing
        gradients[size] = (loss, {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None})
    (whole_loss, whole), (micro_loss, micro) = gradients[None], gradients[micro_batch_size]
    assert micro_loss == pytest.approx(whole_loss, rel=1e-6)
    assert whole.keys() == micro.keys() and len(whole) > 10
    for name in whole:  # float32: summation order differs between the paths
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_trainer_turns_checkpointing_on_when_asked(tmp_path):
    from tests.unit.test_train import _settings, _write_pairs
    from hnclip.train.data import read_shards
    from hnclip.train.trainer import Trainer, TrainSettings

    pairs = read_shards([_write_pairs(tmp_path)])
    clip, preprocess, tokenizer = create_clip("hnclip-tiny")
    trainer = Trainer(TrainSettings(**_settings(grad_checkpointing=True)), clip, tokenizer, preprocess, pairs, None,
                      tmp_path / "state")
    trainer.setup()
    assert clip.transformer.grad_checkpointing and clip.visual.transformer.grad_checkpointing
