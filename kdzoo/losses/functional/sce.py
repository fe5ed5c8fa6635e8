"""Symmetric cross-entropy between student and (detached) teacher logits, as RMT and PSMT use it.

Döbler, Marsden, Yang. "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation".
CVPR 2023, arXiv:2211.13081; code: github.com/mariodoebler/test-time-adaptation
(``utils/losses.py``, ``SymmetricCrossEntropy(alpha=0.5)``), read through kdzoo's spec ``tta.md``
section 4.3.
"""

from __future__ import annotations

import torch

__all__ = ["symmetric_cross_entropy"]


def symmetric_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    r"""Batch mean of ``0.5 * CE(softmax(t) -> s) + 0.5 * CE(softmax(s) -> t)``.

    .. math::
        \mathrm{SCE}(s, t) = \frac{1}{N} \sum_i \Big( -\tfrac12 \sum_c \sigma(t_i)_c
            \log \sigma(s_i)_c - \tfrac12 \sum_c \sigma(s_i)_c \log \sigma(t_i)_c \Big)

    The code's ``alpha = 0.5`` form, written as the code writes it (``SymmetricCrossEntropy``:
    ``-(1 - a) * (t.softmax(1) * s.log_softmax(1)).sum(1) - a * (s.softmax(1) *
    t.log_softmax(1)).sum(1)``, then the batch mean) so that it rounds as the reference does.
    The teacher logits are detached here (the teacher never
    receives a gradient); the student gets gradients from both directions, so unlike plain CE
    the gradient at ``s == t`` is not zero. ``SCE(z, z)`` is the entropy of ``softmax(z)``.

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    forward = (t.softmax(dim=1) * s.log_softmax(dim=1)).sum(dim=1)  # -CE(softmax(t) -> s)
    backward = (s.softmax(dim=1) * t.log_softmax(dim=1)).sum(dim=1)  # -CE(softmax(s) -> t)
    return (-0.5 * forward - 0.5 * backward).mean(dim=0)
