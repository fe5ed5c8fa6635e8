"""Knowledge Concentration: multi-teacher soft targets and the sigmoid distillation loss.

Gao, Guo, Li, Nevatia. "Knowledge Concentration: Learning 100K Object Classifiers in a Single
CNN". arXiv:1711.07607, 2017. No official code exists and the full text was not available to us:
this follows the loss as the kdzoo spec (``specs/classification.md``, section 5.2) reconstructs it
from the abstract and a detailed third-party summary. Each image's label vertical selects one
specialist teacher; the teacher's sigmoid probabilities inside that vertical, cut to its top K,
are the soft targets of a per-class binary cross-entropy; every other class gets target 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo.validation import check_at_least

__all__ = ["concentration_loss", "concentration_targets"]


def concentration_targets(
    teacher_probs: torch.Tensor, vertical_mask: torch.Tensor, *, top_k: int | None = None
) -> torch.Tensor:
    r"""Soft targets :math:`z^*` of the generalist student (spec section 5.2, steps 1-3).

    For sample :math:`i` with label vertical :math:`V(i)` and teacher sigmoid probabilities
    :math:`p_{ij}` (placed at the global class positions :math:`j`):

    .. math::
        z^*_{ij} = \begin{cases}
            p_{ij} & j \in V(i) \text{ and } j \in \mathrm{top}_K\{p_{ik} : k \in V(i)\} \\
            0 & \text{otherwise}
        \end{cases}

    Targets are exactly 0 outside the vertical and below the top K (the paper uses K = 100 of
    the 100K EFT classes). The paper's summary does not say how ties at the K-th place are broken;
    here the lower class index wins (a stable sort), so the targets are deterministic.

    Args:
        teacher_probs: ``(N, C)`` teacher sigmoid probabilities at the global class positions;
            values outside each sample's vertical are ignored (they may be anything).
        vertical_mask: ``(N, C)`` bool, ``True`` on the classes of each sample's label vertical.
        top_k: keep the ``K`` highest probabilities within the vertical; ``None`` (or ``K`` at
            least the vertical's size) keeps the whole vertical.

    Returns:
        ``(N, C)`` targets in ``teacher_probs``' dtype (not detached: callers decide).
    """
    if teacher_probs.ndim != 2 or vertical_mask.shape != teacher_probs.shape:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and vertical_mask "
            f"{tuple(vertical_mask.shape)} must both be (N, C)"
        )
    if vertical_mask.dtype != torch.bool:
        raise ValueError(f"vertical_mask must be a bool tensor, got {vertical_mask.dtype}")
    check_at_least(1, top_k=top_k)
    keep = vertical_mask
    if top_k is not None and top_k < teacher_probs.shape[1]:
        # Rank only the classes of the vertical: everything else sorts last.
        scores = teacher_probs.detach().masked_fill(~vertical_mask, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
        in_top_k = torch.zeros_like(vertical_mask).scatter_(1, order, True)
        # A vertical smaller than K puts out-of-vertical classes in `order`; the mask drops them.
        keep = vertical_mask & in_top_k
    return torch.where(keep, teacher_probs, torch.zeros_like(teacher_probs))


def concentration_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    r"""Sigmoid binary cross-entropy of the student against soft targets (spec section 5.2).

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{i=1}^{N} \sum_{j=1}^{C}
            \big[z^*_{ij} \log \sigma(x_{ij}) + (1 - z^*_{ij}) \log(1 - \sigma(x_{ij}))\big]

    the paper's teacher loss :math:`L_t` with the soft targets :math:`z^*` of
    :func:`concentration_targets` in place of the one-hot labels (with one-hot :math:`z` it *is*
    :math:`L_t`). Reduction: summed over classes, averaged over the batch. No temperature (the
    sources mention none). Computed in the logits form
    :math:`\max(x, 0) - x z + \log(1 + e^{-|x|})` (``binary_cross_entropy_with_logits``),
    finite for any logit, in at least float32.

    Args:
        student_logits: ``(N, C)`` raw student logits.
        soft_targets: ``(N, C)`` targets in ``[0, 1]``.
    """
    if student_logits.ndim != 2 or soft_targets.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and soft targets "
            f"{tuple(soft_targets.shape)} must both be (N, C) with the same shape"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    per_class = F.binary_cross_entropy_with_logits(
        student_logits.to(dtype), soft_targets.to(dtype), reduction="none"
    )
    return per_class.sum(dim=1).mean()
