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
