"""Softmax entropy (the Tent objective) and the soft-target cross-entropy of mean teachers.

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation by Entropy
Minimization". ICLR 2021, arXiv:2006.10726; code: github.com/DequanWang/tent (``tent.py``,
``softmax_entropy``) and the benchmark github.com/mariodoebler/test-time-adaptation; kdzoo spec
``tta.md`` section 2. The soft-target cross-entropy is the CIFAR loss of the mean teacher and
CoTTA (Wang et al., CVPR 2022, arXiv:2203.13591; code github.com/qinenergy/cotta and the benchmark,
``softmax_entropy(x, x_ema)``); spec section 3.
"""

from __future__ import annotations

import torch

__all__ = ["soft_cross_entropy", "softmax_entropy"]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Batch mean of the Shannon entropy of ``softmax(logits)`` (natural log).

    .. math::
        H = \frac{1}{N} \sum_i -\sum_c \sigma(z_i)_c \log \sigma(z_i)_c

    Computed in at least float32 from ``log_softmax`` (stable for large logits), written as the
    Tent code writes it, ``-(z.softmax(1) * z.log_softmax(1)).sum(1).mean(0)``, so that it rounds
    as the reference does (``exp(log_softmax)`` instead of ``softmax`` drifts by a few ulps, which
    compounds over adaptation steps). Uniform predictions over ``C`` classes give ``ln C``;
    one-hot-like predictions give ``~0``.

    Args:
        logits: ``(N, C)`` logits.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -(z.softmax(dim=1) * z.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""Batch mean of ``CE(softmax(t) -> s)``, the teacher's distribution as a soft target.

    .. math::
        \mathrm{CE} = \frac{1}{N} \sum_i -\sum_c \sigma(t_i)_c \log \sigma(s_i)_c

    The teacher logits are detached (the teacher never receives a gradient). Its gradient with
    respect to the student logits is ``(softmax(s) - softmax(t)) / N``, zero where the two agree
    (unlike :func:`~kdzoo.losses.functional.symmetric_cross_entropy`).

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (N, C)"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = student_logits.to(dtype).log_softmax(dim=1)
    p_t = teacher_logits.detach().to(dtype).softmax(dim=1)
    return -(p_t * log_p_s).sum(dim=1).mean()
