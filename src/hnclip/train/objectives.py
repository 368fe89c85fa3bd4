"""What a step minimises beside the seed's contrastive loss: the terms that compare the student with the frozen
baseline it started from (the teacher), combined with the contrastive loss by the cell's settings.

    loss = (1 - m) * contrastive + m * preference + w_distillation * distillation + w_anchor * feature_anchor
           + w_l2 * L2-SP

m = ``preference_mix`` (1: the preference loss alone). Each term's formula is in ``hnclip.regularisers``; the step
log keeps every term unweighted in its own column, and ``loss`` is the weighted total.
"""

from __future__ import annotations

import copy

import torch

from hnclip.losses import caption_similarities
from hnclip.pipeline.grid import TEACHER_AXES
from hnclip.regularisers import distillation_kl, preference_loss

__all__ = ["TEACHER_TERMS", "frozen_teacher", "uses_teacher", "needs_teacher_captions", "add_teacher_terms",
           "hard_negative_margins"]

TEACHER_TERMS = ("distillation", "feature_anchor", "preference")


def uses_teacher(settings) -> bool:
    return any(getattr(settings, axis) > 0 for axis in TEACHER_AXES)


def needs_teacher_captions(settings) -> bool:
    """Distillation and the preference loss compare caption similarities; the anchor needs the images only."""
    return settings.distillation_weight > 0 or settings.preference_mix > 0


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` as it is now, that never trains: no gradient, so its forward passes build no graph."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def hard_negative_margins(features: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, hard negative) triple: s(v_i, u_i) and s(v_i, h_ik), both [N * K] (cosine similarities)."""
    similarities = caption_similarities(features["image"], features["text"], features["hard"])
    n = features["image"].shape[0]
    positive = similarities[:, :n].diagonal()
    negative = similarities[:, n:]
    return positive[:, None].expand_as(negative).reshape(-1), negative.reshape(-1)


def add_teacher_terms(parts: dict, student: dict, teacher: dict | None, settings) -> tuple[torch.Tensor, dict]:
    """The step's loss from the contrastive ``parts`` and the teacher terms computed on features (distillation,
    preference); the feature anchor works on patch tokens and is added where they are (the trainer's image pass).

    ``student`` and ``teacher``: feature dicts of the same rows (keys image, text, hard, extra, ids)."""
    m = settings.preference_mix
    loss = (1.0 - m) * parts["loss"]
    if settings.distillation_weight > 0:
        parts["distillation"] = distillation_kl(_similarities(student), _similarities(teacher), tau=settings.tau)
        loss = loss + settings.distillation_weight * parts["distillation"]
    if m > 0:
        if student["hard"] is None:
            raise ValueError("the preference loss needs hard negatives, and this batch has none encoded")
        beta = settings.preference_beta if settings.preference_beta is not None else 1.0 / settings.tau
        parts["preference"] = preference_loss(*hard_negative_margins(student), *hard_negative_margins(teacher),
                                              beta=beta)
        loss = loss + m * parts["preference"]
    return loss, parts


def _similarities(features: dict) -> torch.Tensor:
    return caption_similarities(features["image"], features["text"], features["hard"], features["extra"],
                                image_ids=features["ids"])
