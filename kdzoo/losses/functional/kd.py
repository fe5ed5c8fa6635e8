"""Vanilla knowledge distillation loss.

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". NIPS 2014 Deep Learning
Workshop, arXiv:1503.02531. Checked against the `KD` loss of mdistiller
(github.com/megvii-research/mdistiller, `mdistiller/distillers/KD.py`), which uses the same
T^2-scaled, batch-mean KL divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo.validation import check_positive

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0
) -> torch.Tensor:
    r"""Temperature-scaled KL divergence from the teacher's to the student's class distribution.

    .. math::
        \mathcal{L}_{KD} = \frac{T^2}{N} \sum_{i=1}^{N}
            \mathrm{KL}\big(\mathrm{softmax}(t_i / T)\,\|\,\mathrm{softmax}(s_i / T)\big)

    Reduction: mean over the batch (``batchmean``), summed over classes. The ``T^2`` factor keeps
    the gradient magnitude independent of ``T`` (Hinton et al., section 2), so the result combines
    with cross-entropy as ``ce_weight * CE + kd_weight * kd_loss``.

    Args:
        student_logits: ``(N, C)`` raw student logits.
        teacher_logits: ``(N, C)`` raw teacher logits (no gradient is taken through them here,
            but they are not detached either: callers decide).
        temperature: softening temperature ``T > 0``.
    """
    check_positive(temperature=temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape: do student and teacher "
            "predict the same number of classes?"
        )
    # At least float32: under bf16/fp16 autocast the log-softmax difference loses most digits.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
