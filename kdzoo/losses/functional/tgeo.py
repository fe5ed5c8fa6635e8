"""TGeo-KD: trilateral-geometry relation features and the per-sample fused KD / CE loss.

Hu, Wu, et al. "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation". ICLR 2024, arXiv:2312.15112. Official code: github.com/Chengming0501/TGeo-KD
(``5a69cbe``: ``src/fusion_ratio_bilevel.py``, the released code; and the CIFAR-100 code deleted
in ``48aac08``, ``cifar100/lib/models/reweighting.py``), read through kdzoo's spec, section 3.
The paper's equations were not readable; both feature sets below are the code's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdzoo.validation import check_positive

__all__ = ["tgeo_loss", "tgeo_relations"]


def tgeo_relations(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    target: torch.Tensor,
    class_mean_teacher_probs: torch.Tensor,
    *,
    variant: Literal["released", "cifar"] = "released",
) -> torch.Tensor:
    r"""The ``(N, 9C)`` relation features the fusion network reads, per sample.

    With ``S`` the student and ``T`` the teacher probability vectors, ``G`` the one-hot label and
    ``M = class_mean_teacher_probs[y]`` the teacher's average probability vector over the training
    samples of the label's class (the "inter-sample relation"):

    * ``"released"`` (default; the released code's ``fusion_ratio_bilevel.py``, option 3):
      ``[S, T, G, M, (M-S)^2, (G-S)^2, (T-S)^2, (T-G)^2, (M-G)^2]``, squares element-wise. Each
      squared difference sums to the squared Euclidean length of one edge of the S-T-G triangle
      (or of an edge to M), the distances the paper's reviewers describe; it is also the only
      version in the official repository today, so it is the default.
    * ``"cifar"`` (the deleted CIFAR-100 code):
      ``[S, T, M, G, |S-G|, |S-T|, |S-M|, (G-M)(G-S), (G-T)(G-S)]``: the last two are the
      per-class terms of the inner products that give the triangle's angles at ``G``.

    Every relation entry is 0 when ``S = T = G = M``. Callers detach ``S``: the ratio must not be
    trained through the student's own training loss (spec 3.6).

    Args:
        student_probs: ``(N, C)`` student probabilities (at temperature 1 in the code).
        teacher_probs: ``(N, C)`` teacher probabilities.
        target: ``(N,)`` class indices.
        class_mean_teacher_probs: ``(C, C)`` per-class mean teacher probabilities (rows sum to 1),
            computed on training data.
        variant: which of the two official feature sets.
    """
    if student_probs.shape != teacher_probs.shape or student_probs.ndim != 2:
        raise ValueError(
            f"student and teacher probabilities must both be (N, C), got "
            f"{tuple(student_probs.shape)} and {tuple(teacher_probs.shape)}"
        )
    num_classes = student_probs.shape[1]
    if class_mean_teacher_probs.shape != (num_classes, num_classes):
        raise ValueError(
            f"class_mean_teacher_probs must be ({num_classes}, {num_classes}), "
            f"got {tuple(class_mean_teacher_probs.shape)}"
        )
    s, t = student_probs, teacher_probs.to(student_probs.dtype)
    g = F.one_hot(target, num_classes).to(s.dtype)
    m = class_mean_teacher_probs.to(device=s.device, dtype=s.dtype)[target]
    if variant == "released":
        parts = [s, t, g, m, (m - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (m - g) ** 2]
    elif variant == "cifar":
        parts = [s, t, m, g, (s - g).abs(), (s - t).abs(), (s - m).abs()]
        parts += [(g - m) * (g - s), (g - t) * (g - s)]
    else:
        raise ValueError(f"variant must be 'released' or 'cifar', got {variant!r}")
    return torch.cat(parts, dim=1)


def tgeo_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    ratio: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Batch mean of ``alpha_i * T^2 * KL(p_t^T || p_s^T) + (1 - alpha_i) * CE(s_i, y_i)``.

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_i \alpha_i\, T^2\,
            \mathrm{KL}\big(\sigma(t_i / T) \,\|\, \sigma(s_i / T)\big)
            + (1 - \alpha_i)\, \mathrm{CE}(s_i, y_i)

    ``alpha = 0`` is cross-entropy, ``alpha = 1`` is :func:`~kdzoo.losses.functional.kd_loss`.
    The deleted CIFAR code has no ``T^2`` (it ran at ``T = 1``, where the two agree).

    Two departures from the official code, both on purpose (they are bugs there, not choices):

    * the released code applies its cross-entropy to softmax *probabilities* (a double softmax).
      On ``s = [[2, 0, -1], [0, 1, 0]]``, ``t = [[0, 2, 0], [1, 0, 3]]``, ``y = [0, 1]``,
      ``alpha = [0.9, 0.1]``, ``T = 1.5`` it gives 1.16296 where the formula gives 0.99471;
    * the deleted CIFAR code broadcasts an ``(N, 1)`` fusion ratio against ``(N,)`` losses, which
      averages it into ``mean(alpha) * mean(KL) + mean(1 - alpha) * mean(CE)`` and loses the
      per-sample weighting the method is about.

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits.
        target: ``(N,)`` class indices.
        ratio: ``(N,)`` fusion ratios ``alpha_i`` in ``[0, 1]``.
        temperature: softening temperature ``T > 0`` of the KL term.
    """
    check_positive(temperature=temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if ratio.shape != target.shape:
        raise ValueError(f"ratio must be ({len(target)},), got {tuple(ratio.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2
    ce = F.cross_entropy(s, target, reduction="none")
    ratio = ratio.to(dtype)
    return (ratio * kl + (1.0 - ratio) * ce).mean()
