"""Decoupled knowledge distillation (DKD) loss.

Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation". CVPR 2022, arXiv:2203.08679.
Checked against ``dkd_loss`` of mdistiller (github.com/megvii-research/mdistiller,
``mdistiller/distillers/DKD.py`` at commit ``e8c5bb3``): same terms, ``T^2`` factors and batch
mean. Two differences in how the numbers are computed, not in what is computed:

- mdistiller takes ``log`` of the summed binary probabilities (``cat_mask``), which is ``-inf``
  once a student probability underflows (target-logit gaps beyond ~100 T in float32). Here the
  binary log-probabilities come from ``log_softmax`` and ``logsumexp``: equal up to rounding,
  always finite.
- The epoch warm-up ``min(epoch / warmup, 1)`` of mdistiller's distiller is not part of the
  loss; :class:`kdzoo.methods.DKD` applies it as the weight of this term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo.validation import check_positive

__all__ = ["dkd_loss"]

# mdistiller removes the target class from the softmax by subtracting 1000 from its scaled logit
# (exp(-1000) is 0 in float32 and float64), not by -inf, which would give 0 * inf = nan in KL.
_MASK_OFFSET = 1000.0


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    r"""KD split into a target-class term (TCKD) and a non-target-class term (NCKD).

    With :math:`p = \mathrm{softmax}(z / T)` and target class :math:`y` of sample :math:`i`,
    :math:`b = [p_y, 1 - p_y]` is the binary target / non-target distribution and
    :math:`\hat p_j = p_j / (1 - p_y)` for :math:`j \ne y` the distribution over the other classes:

    .. math::
        \mathrm{TCKD} = \frac{T^2}{N} \sum_i \mathrm{KL}(b^{t}_i \,\|\, b^{s}_i), \qquad
        \mathrm{NCKD} = \frac{T^2}{N} \sum_i \mathrm{KL}(\hat p^{t}_i \,\|\, \hat p^{s}_i)

    .. math::
        \mathcal{L}_{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

    Reduction: each KL is summed over its classes, then averaged over the batch (``batchmean``),
    times ``T^2`` as in :func:`~kdzoo.losses.functional.kd_loss`. Classical KD is the special case
    ``KD = TCKD + (1 - p^t_y) NCKD`` per sample (paper, Eq. 2), so DKD frees NCKD from the
    teacher-confidence weight ``1 - p^t_y``. mdistiller's CIFAR-100 defaults: ``alpha = 1``,
    ``beta = 8``, ``T = 4``; see :class:`kdzoo.methods.DKD` for the per-pair ``beta``.

    Args:
        student_logits: ``(N, C)`` raw student logits, ``C >= 2``.
        teacher_logits: ``(N, C)`` raw teacher logits (not detached here: callers decide).
        target: ``(N,)`` integer class labels in ``[0, C)``.
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: softening temperature ``T > 0``.
    """
    check_positive(temperature=temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape: do student and teacher "
            "predict the same number of classes?"
        )
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise ValueError(
            f"DKD needs (N, C) logits with C >= 2 classes (a target and at least one non-target "
            f"class), got shape {tuple(student_logits.shape)}"
        )
    if target.shape != student_logits.shape[:1] or target.is_floating_point():
        raise ValueError(
            f"target must hold one integer class index per sample, shape "
            f"({student_logits.shape[0]},), got {target.dtype} of shape {tuple(target.shape)}"
        )
    # At least float32: under bf16/fp16 autocast the log-softmax difference loses most digits.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.to(dtype) / temperature
    gt_mask = torch.zeros_like(student, dtype=torch.bool).scatter_(1, target.unsqueeze(1), True)

    # TCKD: KL between the binary distributions [p_y, sum_{j != y} p_j], in log space.
    log_b_student = _log_binary(F.log_softmax(student, dim=1), gt_mask)
    log_b_teacher = _log_binary(F.log_softmax(teacher, dim=1), gt_mask)
    tckd = F.kl_div(log_b_student, log_b_teacher, reduction="batchmean", log_target=True)

    # NCKD: KL between the distributions over the non-target classes, as mdistiller computes it.
    offset = _MASK_OFFSET * gt_mask.to(dtype)
    log_q_student = F.log_softmax(student - offset, dim=1)
    log_q_teacher = F.log_softmax(teacher - offset, dim=1)
    nckd = F.kl_div(log_q_student, log_q_teacher, reduction="batchmean", log_target=True)

    return (alpha * tckd + beta * nckd) * temperature**2


def _log_binary(log_p: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` log-probabilities ``[log p_y, log sum_{j != y} p_j]`` from a row log-softmax."""
    log_p_target = (log_p * gt_mask).sum(dim=1, keepdim=True)
    log_p_other = torch.logsumexp(log_p.masked_fill(gt_mask, float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_p_target, log_p_other], dim=1)
