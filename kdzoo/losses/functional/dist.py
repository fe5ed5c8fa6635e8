"""DIST loss: relation (Pearson-correlation) matching of class distributions.

Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher". NeurIPS 2022,
arXiv:2205.10536. Official code: github.com/hunto/DIST_KD, ``classification/lib/models/losses/
dist_kd.py``. That file was not readable here; the loss was checked against the same author's
``segmentation/losses/dist_kd.py`` (DIST_KD at ``6d93ca0``) and ``lib/models/losses/dist_kd.py``
of github.com/hunto/image_classification_sota (``2bc4832``, the code base DIST_KD's
classification part comes from), which share the Pearson correlation below (a cosine similarity
of mean-centred vectors with ``eps = 1e-8`` added to the product of norms). The temperature
``tau`` and its ``T^2`` factors follow the paper and the classification code's
``DIST(beta, gamma, tau)`` as reproduced in third-party copies of it.
"""

from __future__ import annotations

import torch

from kdzoo.validation import check_positive

__all__ = ["dist_loss"]

_EPS = 1e-8  # as the official code: added to the product of the two norms


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    r"""One minus the Pearson correlation of student and teacher probabilities, by row and column.

    With :math:`Y^s = \mathrm{softmax}(s / T)` and :math:`Y^t = \mathrm{softmax}(t / T)`, both
    ``(N, C)``, and :math:`\rho(u, v) = \frac{\langle u - \bar u, v - \bar v\rangle}
    {\|u - \bar u\|\,\|v - \bar v\| + \epsilon}`, :math:`\epsilon = 10^{-8}`:

    .. math::
        \mathcal{L}_{inter} = T^2 \Big(1 - \frac{1}{N} \sum_{i=1}^{N} \rho(Y^s_{i:}, Y^t_{i:})\Big)

    .. math::
        \mathcal{L}_{intra} = T^2 \Big(1 - \frac{1}{C} \sum_{c=1}^{C} \rho(Y^s_{:c}, Y^t_{:c})\Big)

    .. math::
        \mathcal{L}_{DIST} = \beta\,\mathcal{L}_{inter} + \gamma\,\mathcal{L}_{intra}

    Reduction: the inter-class term averages over the samples (correlation across classes), the
    intra-class term over the classes (correlation across the batch). Each term lies in
    ``[0, 2 T^2]``. The intra-class term depends on the whole batch: it is computed over the local
    batch (the official code does not gather across devices either), and with ``N = 1`` it is the
    constant ``T^2`` (a single value has no spread), without gradient. Combined with
    cross-entropy as ``ce_weight * CE + kd_weight * dist_loss``.

    Args:
        student_logits: ``(N, C)`` raw student logits.
        teacher_logits: ``(N, C)`` raw teacher logits (not detached here: callers decide).
        beta: weight of the inter-class (per-sample) relation term.
        gamma: weight of the intra-class (per-class) relation term.
        temperature: softening temperature ``T > 0``.
    """
    check_positive(temperature=temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape: do student and teacher "
            "predict the same number of classes?"
        )
    if student_logits.ndim != 2:
        raise ValueError(f"DIST needs (N, C) logits, got shape {tuple(student_logits.shape)}")
    # At least float32: under bf16/fp16 autocast the centred probabilities lose most digits.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    y_student = torch.softmax(student_logits.to(dtype) / temperature, dim=1)
    y_teacher = torch.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    inter = 1 - _pearson_rows(y_student, y_teacher).mean()
    intra = 1 - _pearson_rows(y_student.t(), y_teacher.t()).mean()
    return (beta * inter + gamma * intra) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)
