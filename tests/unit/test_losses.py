"""HNC loss vs a naive double loop over docs/design.md's formula; edge cases, gradients, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from hnclip.losses import hard_negative_accuracy, hnc_contrastive_loss, plain_clip_loss

torch.set_num_threads(1)


# ---- naive reference: docs/design.md's formula, one exp at a time --------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm() * b.norm())


def naive_hnc_loss(v, u, h, r, *, alpha, tau, ids=None, with_hnc=True):
    """-log(positive / denominator) per row, summed with explicit Python loops; returns (i2t, t2i)."""
    n = v.shape[0]
    ids = list(range(n)) if ids is None else [int(x) if torch.is_tensor(x) else x for x in ids]
    image_to_text = 0.0
    for i in range(n):
        positive = torch.exp(cosine(v[i], u[i]) / tau)
        denominator = positive
        if with_hnc:
            for k in range(h.shape[1]):
                denominator = denominator + alpha * torch.exp(cosine(v[i], h[i, k]) / tau)
        for j in range(n):
            if j != i and ids[j] != ids[i]:
                denominator = denominator + torch.exp(cosine(v[i], u[j]) / tau)
        if r is not None:
            for m in range(r.shape[1]):
                denominator = denominator + torch.exp(cosine(v[i], r[i, m]) / tau)
        image_to_text = image_to_text - torch.log(positive / denominator)
    text_to_image = 0.0
    for i in range(n):
        positive = torch.exp(cosine(v[i], u[i]) / tau)
        denominator = positive
        for k in range(n):
            if k != i and ids[k] != ids[i]:
                denominator = denominator + torch.exp(cosine(v[k], u[i]) / tau)
        text_to_image = text_to_image - torch.log(positive / denominator)
    return image_to_text / n, text_to_image / n


def random_batch(seed: int, *, n: int, k: int, m: int, d: int, dtype=torch.float64):
    """Unnormalised random features (scaled per row) so the loss must normalise them itself."""
    g = torch.Generator().manual_seed(seed)

    def feats(*shape):
        x = torch.randn(*shape, generator=g, dtype=dtype)
        return x * (0.5 + 3 * torch.rand(*shape[:-1], 1, generator=g, dtype=dtype))

    return feats(n, d), feats(n, d), feats(n, k, d), (feats(n, m, d) if m > 0 else None)


BATCH_SHAPES = [  # (seed, N, K, M, D)
    (0, 1, 1, 0, 3),
    (1, 4, 1, 0, 5),
    (2, 5, 3, 2, 4),
    (3, 6, 2, 3, 2),
]


# ---- value vs the naive loop ----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("seed, n, k, m, d", BATCH_SHAPES)
def test_matches_naive_loop(seed, n, k, m, d, alpha, tau):
    v, u, h, r = random_batch(seed, n=n, k=k, m=m, d=d)
    parts = hnc_contrastive_loss(v, u, h, alpha=alpha, tau=tau, extra_negative_features=r, return_parts=True)
    i2t, t2i = naive_hnc_loss(v, u, h, r, alpha=alpha, tau=tau)
    torch.testing.assert_close(parts["image_to_text"], i2t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts["text_to_image"], t2i, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts["loss"], i2t + t2i, rtol=1e-10, atol=1e-10)
    assert parts["loss"].dtype == torch.float64


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("ids_kind", ["tensor", "str"])
def test_duplicate_image_ids_match_naive_loop(alpha, tau, ids_kind):
    v, u, h, r = random_batch(7, n=6, k=2, m=2, d=4)
    ids = [3, 1, 3, 2, 1, 3]
    v[2] = v[0] * 2.0  # rows of one image usually share (or nearly share) the image feature
    passed_ids = torch.tensor(ids) if ids_kind == "tensor" else [f"img{x}" for x in ids]
    parts = hnc_contrastive_loss(
        v, u, h, alpha=alpha, tau=tau, extra_negative_features=r, image_ids=passed_ids, return_parts=True
    )
    i2t, t2i = naive_hnc_loss(v, u, h, r, alpha=alpha, tau=tau, ids=ids)
    torch.testing.assert_close(parts["image_to_text"], i2t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts["text_to_image"], t2i, rtol=1e-10, atol=1e-10)
    # And the ids really change the value (both directions), so the mask is not a no-op.
    unmasked = hnc_contrastive_loss(v, u, h, alpha=alpha, tau=tau, extra_negative_features=r, return_parts=True)
    assert unmasked["image_to_text"] > parts["image_to_text"] + 1e-6
    assert unmasked["text_to_image"] > parts["text_to_image"] + 1e-6


def test_unique_ids_equal_no_ids():
    v, u, h, r = random_batch(8, n=5, k=2, m=1, d=3)
    with_ids = hnc_contrastive_loss(v, u, h, alpha=0.7, tau=0.1, extra_negative_features=r, image_ids=[5, 6, 7, 8, 9])
    without = hnc_contrastive_loss(v, u, h, alpha=0.7, tau=0.1, extra_negative_features=r)
    assert torch.equal(with_ids, without)


# ---- hand-computed closed forms ------------------------------------------------------------------


def test_tiny_case_closed_form():
    # v1 = u1 = (1,0), v2 = u2 = (0,1) (texts scaled: the loss normalises), h1 = -v1, h2 = -v2.
    # Per row: image->text = log(1 + alpha e^{-2/tau} + e^{-1/tau}), text->image = log(1 + e^{-1/tau}).
    # tau = 0.5, alpha = 0.5: total = log(1 + 0.5 e^-4 + e^-2) + log(1 + e^-2).
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    u = torch.tensor([[3.0, 0.0], [0.0, 0.2]], dtype=torch.float64)
    h = torch.tensor([[[-2.0, 0.0]], [[0.0, -5.0]]], dtype=torch.float64)
    loss = hnc_contrastive_loss(v, u, h, alpha=0.5, tau=0.5)
    expected = 0.2618898449442359
    assert math.isclose(expected, math.log(1 + 0.5 * math.exp(-4) + math.exp(-2)) + math.log(1 + math.exp(-2)))
    assert loss.item() == pytest.approx(expected, rel=1e-14)


def test_tiny_case_with_shared_image_closed_form():
    # Both rows show image "a": v1 = v2 = (1,0), u1 = (1,0), u2 = (0,1), h1 = (0,1), h2 = (-1,0).
    # Row 1: -log(e / (e + alpha e^0)); row 2: -log(e^0 / (e^0 + alpha e^-1)); u_j of the other row is
    # not a negative, so text->image is 0. tau = 1, alpha = 1: total = (log(1+e^-1) + log(1+e^-1)) / 2.
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    h = torch.tensor([[[0.0, 1.0]], [[-1.0, 0.0]]], dtype=torch.float64)
    parts = hnc_contrastive_loss(v, u, h, alpha=1.0, tau=1.0, image_ids=["a", "a"], return_parts=True)
    expected = 0.31326168751822286
    assert math.isclose(expected, math.log(1 + math.exp(-1)))
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-14)
    assert parts["text_to_image"].item() == 0.0


# ---- alpha = 0 and the plain CLIP loss ------------------------------------------------------------


def test_alpha_zero_removes_hnc_term_exactly():
    v, u, h, r = random_batch(11, n=5, k=3, m=2, d=4)
    i2t, t2i = naive_hnc_loss(v, u, h, r, alpha=0.0, tau=0.05, with_hnc=False)
    loss = hnc_contrastive_loss(v, u, h, alpha=0.0, tau=0.05, extra_negative_features=r)
    torch.testing.assert_close(loss, i2t + t2i, rtol=1e-10, atol=1e-10)
    # Hard negatives identical to the positives would dominate if they leaked in.
    leaked = hnc_contrastive_loss(v, u, u[:, None, :].expand(-1, 3, -1), alpha=0.0, tau=0.05, extra_negative_features=r)
    assert torch.equal(loss, leaked)


def test_alpha_zero_gradients_are_finite_and_zero_for_hard_negatives():
    v, u, h, _ = random_batch(12, n=4, k=2, m=0, d=3)
    for x in (v, u, h):
        x.requires_grad_(True)
    hnc_contrastive_loss(v, u, h, alpha=0.0, tau=0.07).backward()
    assert all(torch.isfinite(x.grad).all() for x in (v, u, h))
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert v.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_plain_clip_loss_equals_alpha_zero_hnc_loss(tau):
    v, u, h, _ = random_batch(13, n=6, k=2, m=0, d=5)
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    for image_ids in (None, ids):
        plain = plain_clip_loss(v, u, tau=tau, image_ids=image_ids, return_parts=True)
        hnc = hnc_contrastive_loss(v, u, h, alpha=0.0, tau=tau, image_ids=image_ids, return_parts=True)
        torch.testing.assert_close(plain, hnc, rtol=1e-12, atol=1e-12)
        i2t, t2i = naive_hnc_loss(v, u, h, None, alpha=0.0, tau=tau, ids=None if image_ids is None else ids)
        torch.testing.assert_close(plain["image_to_text"], i2t, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(plain["text_to_image"], t2i, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(plain_clip_loss(v, u, tau=tau, image_ids=image_ids), i2t + t2i, rtol=1e-10, atol=1e-10)


def test_plain_clip_loss_is_twice_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    v, u, _, _ = random_batch(14, n=6, k=1, m=0, d=5)
    tau = 0.07
    reference = open_clip_loss.ClipLoss()(
        torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(u, dim=-1), 1.0 / tau
    )
    torch.testing.assert_close(plain_clip_loss(v, u, tau=tau), 2 * reference, rtol=1e-12, atol=1e-12)


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, tau, ids", [(0.5, 0.07, None), (5.0, 1.0, [0, 1, 0, 1]), (1.0, 0.01, [0, 0, 1, 2])])
def test_gradients_match_naive_loop(alpha, tau, ids):
    v, u, h, r = random_batch(21, n=4, k=2, m=2, d=3)
    inputs = [x.clone().requires_grad_(True) for x in (v, u, h, r)]
    reference = [x.clone().requires_grad_(True) for x in (v, u, h, r)]
    hnc_contrastive_loss(*inputs[:3], alpha=alpha, tau=tau, extra_negative_features=inputs[3], image_ids=ids).backward()
    sum(naive_hnc_loss(*reference, alpha=alpha, tau=tau, ids=ids)).backward()
    for got, want in zip(inputs, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-10)


def test_gradcheck():
    v, u, h, r = random_batch(22, n=3, k=2, m=1, d=3)
    inputs = tuple(x.requires_grad_(True) for x in (v, u, h, r))

    def loss(v, u, h, r):
        return hnc_contrastive_loss(v, u, h, alpha=0.8, tau=0.2, extra_negative_features=r, image_ids=[0, 1, 0])

    assert torch.autograd.gradcheck(loss, inputs)


# ---- numerics and dtypes -------------------------------------------------------------------------


def test_tiny_tau_stays_finite():
    v, u, h, r = random_batch(31, n=8, k=3, m=2, d=6, dtype=torch.float32)
    for x in (v, u, h, r):
        x.requires_grad_(True)
    loss = hnc_contrastive_loss(v, u, h, alpha=1.0, tau=1e-3, extra_negative_features=r)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(x.grad).all() for x in (v, u, h, r))
    # exp(s / 1e-3) overflows even float64, so no naive loop here. Instead use the hard-max limit: each
    # row's term is (max over its logits) - positive + c with 0 <= c <= log(number of logits), so
    # tau * loss is the mean hinge of the similarities within tau * log(13) per direction.
    vn, un, hn, rn = (torch.nn.functional.normalize(x.detach().double(), dim=-1) for x in (v, u, h, r))
    sims = vn @ un.T
    positives = sims.diagonal()
    row_max = torch.cat([sims, torch.einsum("nd,nkd->nk", vn, hn), torch.einsum("nd,nkd->nk", vn, rn)], 1).amax(1)
    hinge = (row_max - positives).mean() + (sims.amax(0) - positives).mean()
    assert 0 <= loss.item() * 1e-3 - hinge.item() <= 2 * 1e-3 * math.log(13)
    assert hinge > 0.1  # the batch is random, so the limit is not trivially 0


def test_bf16_inputs_under_autocast_are_computed_in_float32():
    v, u, h, r = random_batch(32, n=6, k=2, m=2, d=8, dtype=torch.float32)
    bf16 = [x.to(torch.bfloat16) for x in (v, u, h, r)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hnc_contrastive_loss(*bf16[:3], alpha=1.0, tau=0.07, extra_negative_features=bf16[3])
    v32, u32, h32, r32 = (x.float() for x in bf16)
    upcast = hnc_contrastive_loss(v32, u32, h32, alpha=1.0, tau=0.07, extra_negative_features=r32)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, upcast, rtol=1e-6, atol=1e-6)


def test_autocast_bf16_model_close_to_float32():
    torch.manual_seed(33)
    image_tower, text_tower = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    images, texts, negatives = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 3, 16)

    def run():
        return hnc_contrastive_loss(
            image_tower(images), text_tower(texts), text_tower(negatives), alpha=1.0, tau=0.07
        )

    reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert image_tower(images).dtype == torch.bfloat16  # autocast really is on
        mixed = run()
    mixed.backward()
    assert mixed.dtype == torch.float32
    assert torch.isfinite(image_tower.weight.grad).all()
    torch.testing.assert_close(mixed, reference, rtol=3e-2, atol=3e-2)


# ---- hard-negative accuracy ----------------------------------------------------------------------


def test_hard_negative_accuracy_counts_strict_wins():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    h = torch.tensor([
        [[0.0, 1.0], [-1.0, 0.0]],  # row 0: positive 1 beats 0 and -1 -> win
        [[0.0, 1.0], [0.0, 2.0]],   # row 1: positive 0 loses to 1 -> loss
        [[0.0, 1.0], [-1.0, 0.0]],  # row 2: positive cos 45 deg ties with h = (0,1) -> not a win
    ])
    assert hard_negative_accuracy(v, u, h).item() == pytest.approx(1 / 3)


def test_hard_negative_accuracy_matches_naive_loop():
    v, u, h, _ = random_batch(41, n=20, k=3, m=0, d=4)
    wins = sum(
        bool(cosine(v[i], u[i]) > max(cosine(v[i], h[i, k]) for k in range(3))) for i in range(20)
    )
    result = hard_negative_accuracy(v, u, h)
    assert result.dtype == torch.float64 and result.ndim == 0
    assert 0 < wins < 20
    assert result.item() == pytest.approx(wins / 20, abs=1e-15)


# ---- bad arguments -------------------------------------------------------------------------------


@pytest.fixture
def batch():
    return random_batch(51, n=3, k=2, m=1, d=4)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha_is_rejected(batch, alpha):
    v, u, h, _ = batch
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        hnc_contrastive_loss(v, u, h, alpha=alpha, tau=0.07)


@pytest.mark.parametrize("tau", [0.0, -0.07, float("nan"), float("inf")])
def test_bad_tau_is_rejected(batch, tau):
    v, u, h, _ = batch
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        hnc_contrastive_loss(v, u, h, alpha=1.0, tau=tau)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        plain_clip_loss(v, u, tau=tau)


def test_bad_shapes_name_the_argument(batch):
    v, u, h, r = batch
    cases = [
        (dict(image_features=v[0]), "image_features must have shape"),
        (dict(text_features=u[:2]), "text_features must have the shape"),
        (dict(hard_negative_features=h[:, :0]), r"hard_negative_features must have shape \[N=3, C>=1, D=4\]"),
        (dict(hard_negative_features=h[:2]), "hard_negative_features must have shape"),
        (dict(extra_negative_features=r[..., :3]), "extra_negative_features must have shape"),
        (dict(image_ids=[0, 1]), "image_ids has 2 entries but the batch has 3 rows"),
        (dict(image_ids=torch.tensor([[0, 1, 2]])), r"image_ids must have shape \(3,\)"),
    ]
    for override, message in cases:
        args = dict(image_features=v, text_features=u, hard_negative_features=h)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            hnc_contrastive_loss(alpha=1.0, tau=0.07, **args)


def test_bad_types_are_rejected(batch):
    v, u, h, _ = batch
    with pytest.raises(TypeError, match="text_features must be a floating-point tensor"):
        hnc_contrastive_loss(v, u.long(), h, alpha=1.0, tau=0.07)
    with pytest.raises(TypeError, match="image_ids must be an integer tensor"):
        hnc_contrastive_loss(v, u, h, alpha=1.0, tau=0.07, image_ids=torch.zeros(3))
    with pytest.raises(TypeError, match="single string"):
        hnc_contrastive_loss(v, u, h, alpha=1.0, tau=0.07, image_ids="abc")
