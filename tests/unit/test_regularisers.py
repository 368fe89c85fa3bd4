"""The objectives beside the HNC loss, each against a naive loop over its formula (hnclip.regularisers)."""

from __future__ import annotations

import math

import pytest
import torch

from hnclip.regularisers import alpha_at_step, distillation_kl, feature_anchor, l2_sp, preference_loss


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_l2_sp_is_the_squared_distance_of_the_trainable_parameters_only():
    trainable = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    start = [torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.0])]
    value = l2_sp([trainable, frozen], start)
    assert value.item() == pytest.approx(1.0 + 0.0 + 4.0)
    value.backward()
    assert trainable.grad.tolist() == [2.0, 0.0, 4.0]
    with pytest.raises(ValueError, match="no trainable parameter"):
        l2_sp([frozen], [torch.tensor([0.0])])


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / tau) for v in s_row]
        t_exp = [math.exp(v / tau) for v in t_row]
        p = [e / sum(t_exp) for e in t_exp]
        q = [e / sum(s_exp) for e in s_exp]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(student)


def test_distillation_kl_equals_the_formula_and_is_zero_for_the_teacher_itself():
    student = torch.randn(4, 3, generator=generator(0), dtype=torch.float64) * 0.3
    teacher = torch.randn(4, 3, generator=generator(1), dtype=torch.float64) * 0.3
    assert distillation_kl(student, teacher, tau=0.07).item() == pytest.approx(naive_kl(student, teacher, 0.07))
    assert distillation_kl(teacher, teacher, tau=0.07).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"must both be \[N, C\]"):
        distillation_kl(student, teacher[:, :2], tau=0.07)


def test_feature_anchor_is_the_mean_squared_distance_and_leaves_the_baseline_without_gradient():
    student = torch.randn(2, 5, 4, generator=generator(2), dtype=torch.float64, requires_grad=True)
    baseline = torch.randn(2, 5, 4, generator=generator(3), dtype=torch.float64, requires_grad=True)
    naive = sum((a - b) ** 2 for a, b in zip(student.flatten().tolist(), baseline.flatten().tolist())) / 40
    value = feature_anchor(student, baseline)
    assert value.item() == pytest.approx(naive)
    value.backward()
    assert baseline.grad is None and student.grad is not None


def test_preference_loss_equals_the_dpo_formula_on_similarity_margins():
    pos, neg, ref_pos, ref_neg = (torch.randn(6, generator=generator(k), dtype=torch.float64) for k in range(4))
    beta = 5.0
    naive = sum(-math.log(1 / (1 + math.exp(-beta * ((p - n) - (rp - rn)))))
                for p, n, rp, rn in zip(pos.tolist(), neg.tolist(), ref_pos.tolist(), ref_neg.tolist())) / 6
    assert preference_loss(pos, neg, ref_pos, ref_neg, beta=beta).item() == pytest.approx(naive)
    # the student equal to its reference: every margin difference is 0, the loss log 2
    assert preference_loss(pos, neg, pos, neg, beta=beta).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta must be"):
        preference_loss(pos, neg, ref_pos, ref_neg, beta=0.0)


def test_alpha_is_constant_or_ramps_linearly_over_the_first_steps():
    assert [alpha_at_step(4.0, step) for step in (1, 50)] == [4.0, 4.0]
    assert [alpha_at_step(4.0, step, ramp_steps=4) for step in (1, 2, 3, 4, 9)] == [1.0, 2.0, 3.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        alpha_at_step(-1.0, 1)


def test_distillation_leaves_masked_captions_out_of_both_distributions():
    student = torch.randn(3, 4, generator=generator(4), dtype=torch.float64) * 0.3
    teacher = torch.randn(3, 4, generator=generator(5), dtype=torch.float64) * 0.3
    mask = torch.tensor([[False, True, False, False], [False, False, False, False], [True, False, False, False]])
    masked_student, masked_teacher = student.masked_fill(mask, -math.inf), teacher.masked_fill(mask, -math.inf)
    naive = sum(naive_kl(s[~m][None], t[~m][None], 0.1) for s, t, m in zip(student, teacher, mask)) / 3
    value = distillation_kl(masked_student.requires_grad_(), masked_teacher, tau=0.1)
    assert value.item() == pytest.approx(naive)
    value.backward()
    assert torch.isfinite(masked_student.grad).all()
    with pytest.raises(ValueError, match="mask .* different captions"):
        distillation_kl(masked_student, teacher, tau=0.1)


# ---- the terms as the trainer combines them (hnclip.train.objectives) ---------------------------------------------

def _features(seed: int, n: int = 4, k: int = 2, m: int = 0, dim: int = 5) -> dict:
    g = generator(seed)
    return {
        "image": torch.randn(n, dim, generator=g, dtype=torch.float64),
        "text": torch.randn(n, dim, generator=g, dtype=torch.float64),
        "hard": torch.randn(n, k, dim, generator=g, dtype=torch.float64) if k else None,
        "extra": torch.randn(n, m, dim, generator=g, dtype=torch.float64) if m else None,
        "ids": torch.tensor([0, 1, 0, 2][:n]),
    }


def _cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_caption_similarities_rank_the_batch_positives_then_the_images_own_negatives():
    from hnclip.losses import caption_similarities

    f = _features(0, k=2, m=1)
    table = caption_similarities(f["image"], f["text"], f["hard"], f["extra"], image_ids=f["ids"])
    assert table.shape == (4, 4 + 2 + 1)
    for i in range(4):
        for j in range(4):
            expected = -math.inf if i != j and f["ids"][i] == f["ids"][j] else _cosine(f["image"][i], f["text"][j])
            assert table[i, j].item() == pytest.approx(expected)
        assert table[i, 4].item() == pytest.approx(_cosine(f["image"][i], f["hard"][i, 0]))
        assert table[i, 5].item() == pytest.approx(_cosine(f["image"][i], f["hard"][i, 1]))
        assert table[i, 6].item() == pytest.approx(_cosine(f["image"][i], f["extra"][i, 0]))


def test_hard_negative_margins_pair_each_positive_with_each_of_its_negatives():
    from hnclip.train.objectives import hard_negative_margins

    f = _features(1, k=3)
    positive, negative = hard_negative_margins(f)
    assert positive.shape == negative.shape == (12,)
    for i in range(4):
        for k in range(3):
            assert positive[3 * i + k].item() == pytest.approx(_cosine(f["image"][i], f["text"][i]))
            assert negative[3 * i + k].item() == pytest.approx(_cosine(f["image"][i], f["hard"][i, k]))


class _Settings:
    def __init__(self, **values):
        self.tau, self.distillation_weight, self.preference_mix, self.preference_beta = 0.1, 0.0, 0.0, None
        self.__dict__.update(values)


@pytest.mark.parametrize("distillation_weight, mix", [(0.0, 0.0), (2.0, 0.0), (0.0, 0.25), (0.5, 1.0)])
def test_the_step_loss_mixes_contrastive_and_preference_and_adds_weighted_distillation(distillation_weight, mix):
    from hnclip.losses import caption_similarities
    from hnclip.train.objectives import add_teacher_terms, hard_negative_margins

    student, teacher = _features(2), _features(3)
    contrastive = torch.tensor(1.7, dtype=torch.float64)
    settings = _Settings(distillation_weight=distillation_weight, preference_mix=mix)
    loss, parts = add_teacher_terms({"loss": contrastive}, student, teacher, settings)
    similarities = [caption_similarities(f["image"], f["text"], f["hard"], image_ids=f["ids"])
                    for f in (student, teacher)]
    distillation = distillation_kl(*similarities, tau=0.1)
    preference = preference_loss(*hard_negative_margins(student), *hard_negative_margins(teacher), beta=1 / 0.1)
    expected = (1 - mix) * 1.7 + distillation_weight * distillation.item() + mix * preference.item()
    assert loss.item() == pytest.approx(expected)
    assert ("distillation" in parts) == (distillation_weight > 0) and ("preference" in parts) == (mix > 0)


def test_the_preference_loss_needs_hard_negatives():
    from hnclip.train.objectives import add_teacher_terms

    with pytest.raises(ValueError, match="needs hard negatives"):
        add_teacher_terms({"loss": torch.tensor(1.0)}, _features(0, k=0), _features(1, k=0),
                          _Settings(preference_mix=0.5))
