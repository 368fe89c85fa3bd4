"""Objectives beside the seed's HNC loss: regularisers that keep what the tower already does, a preference loss
over (image, positive, negative) triples, and the hard-negative weight's schedule.

With s the cosine similarity, tau the temperature, theta the trainable parameters and theta_0 their initial values:

    L2-SP           sum_p ||theta_p - theta_0,p||^2                                  (over trainable parameters)
    distillation    mean_i KL( softmax(t_i / tau) || softmax(z_i / tau) )
                    z_i, t_i: the student's and the frozen baseline's similarities of image i to the captions its
                    image->text loss ranks (the batch's positives, its hard and extra negatives); a caption masked out
                    of the loss (-inf, another row of the same image) is out of both distributions
    feature anchor  mean over images, patches and channels of (f_student - f_baseline)^2
                    f: penultimate-layer patch features, what LLaVA's projector reads
    preference      mean_i -log sigmoid( beta [ (s(v_i, u_i) - s(v_i, h_i)) - (s0(v_i, u_i) - s0(v_i, h_i)) ] )
                    (DPO's loss with the similarity margin for the log-probability ratio; s0: the reference model)

Every function takes features or logits already computed, works in float32 or wider, and returns a scalar.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["l2_sp", "distillation_kl", "feature_anchor", "preference_loss", "alpha_at_step"]


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def l2_sp(parameters: Iterable[torch.nn.Parameter], initial: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared distance of the trainable parameters to their initial values (L2-SP, Li et al. 2018).

    ``parameters`` and ``initial`` are paired in order; frozen parameters (``requires_grad`` False) are skipped.
    """
    total = None
    for parameter, start in zip(parameters, initial, strict=True):
        if not parameter.requires_grad:
            continue
        if parameter.shape != start.shape:
            raise ValueError(f"parameter of shape {tuple(parameter.shape)} paired with an initial value of shape "
                             f"{tuple(start.shape)}")
        term = (_at_least_float32(parameter) - _at_least_float32(start.detach())).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no trainable parameter: L2-SP is undefined")
    return total


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """KL from the frozen teacher's image->text distribution to the student's, averaged over images.

    Both are [N, C] similarities of each image to its C captions (``hnclip.losses.caption_similarities``); the
    teacher's carry no gradient. Entries that are -inf (masked captions) must be the same in both and are left out.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be [N, C], got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    masked = torch.isneginf(teacher_logits)
    if not torch.equal(masked, torch.isneginf(student_logits)):
        raise ValueError("student and teacher logits mask (-inf) different captions")
    log_student = F.log_softmax(_at_least_float32(student_logits) / tau, dim=1).masked_fill(masked, 0.0)
    log_teacher = F.log_softmax(_at_least_float32(teacher_logits.detach()) / tau, dim=1).masked_fill(masked, 0.0)
    teacher = log_teacher.exp().masked_fill(masked, 0.0)
    return (teacher * (log_teacher - log_student)).sum(dim=1).mean()


def feature_anchor(student_features: torch.Tensor, baseline_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the student's and the frozen baseline's penultimate patch features."""
    if student_features.shape != baseline_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(student_features.shape)} vs {tuple(baseline_features.shape)}")
    return (_at_least_float32(student_features) - _at_least_float32(baseline_features.detach())).pow(2).mean()


def preference_loss(
    positive: torch.Tensor, negative: torch.Tensor, reference_positive: torch.Tensor,
    reference_negative: torch.Tensor, *, beta: float,
) -> torch.Tensor:
    """DPO-style loss on the student's positive-negative margin over the reference model's, per triple.

    All four are [N] similarities s(image, caption); the reference's carry no gradient.
    """
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    shapes = {tuple(t.shape) for t in (positive, negative, reference_positive, reference_negative)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four similarities must be [N] vectors of one length, got shapes {sorted(shapes)}")
    margin = _at_least_float32(positive) - _at_least_float32(negative)
    reference_margin = _at_least_float32(reference_positive.detach()) - _at_least_float32(reference_negative.detach())
    return -F.logsigmoid(beta * (margin - reference_margin)).mean()


def alpha_at_step(alpha: float, step: int, *, ramp_steps: int = 0) -> float:
    """The hard-negative weight at ``step`` (1-based): ``alpha`` from the start, or rising linearly from alpha/K to
    alpha over the first K = ``ramp_steps`` steps."""
    if alpha < 0 or ramp_steps < 0 or step < 1:
        raise ValueError(f"need alpha >= 0, ramp_steps >= 0 and step >= 1, got {alpha}, {ramp_steps}, {step}")
    if ramp_steps == 0 or step >= ramp_steps:
        return float(alpha)
    return float(alpha) * step / ramp_steps
