"""ND loss: regularising the student feature's norm and direction towards the teacher's class mean.

Wang, Cheng, Yao, Chen, Zhang, Li, Zhang. "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction". ECCV 2024, arXiv:2305.17007. Official code:
github.com/WangYZ1608/Knowledge-Distillation-via-ND (checked at fc6f3f9 via the spec in
``shared/specs/classification.md`` section 1): the per-sample loop of the official code is
vectorised here; the result is mathematically identical.
"""

from __future__ import annotations

import torch

__all__ = ["nd_loss"]


def nd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    class_means: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    r"""Batch mean of ``1 - <f_s, c_y / ||c_y||> / max(||f_s||, ||f_t||)``.

    .. math::
        \mathcal{L}_{ND} = \frac{1}{N} \sum_i \Big(1 - \frac{\langle f_{s,i},\,
            c_{y_i} / \lVert c_{y_i} \rVert \rangle}{\max(\lVert f_{s,i} \rVert,
            \lVert f_{t,i} \rVert)}\Big)

    Only the class mean is normalised: while ``||f_s|| < ||f_t||`` the loss also pushes the
    student's norm up to the teacher's per-sample norm; above it, only the direction is trained.
    Range ``[0, 2]``; no temperature, no margin. Reduction: mean over the batch.

    Args:
        student_embedding: ``(N, D)`` student features (after the projector when the student's
            width differs from the teacher's).
        teacher_embedding: ``(N, D)`` teacher features of the same images, or their ``(N,)``
            norms (only the norms are used; a teacher cache stores only those).
        class_means: ``(C, D)`` teacher class-mean embeddings over the training set.
        target: ``(N,)`` class indices.
    """
    per_sample = teacher_embedding.ndim == 1
    expected = student_embedding.shape[:1] if per_sample else student_embedding.shape
    if teacher_embedding.shape != expected:
        raise ValueError(
            f"student embedding {tuple(student_embedding.shape)} and teacher embedding "
            f"{tuple(teacher_embedding.shape)} differ: project the student to the teacher's width"
        )
    if class_means.ndim != 2 or class_means.shape[1] != student_embedding.shape[1]:
        raise ValueError(
            f"class_means must be (num_classes, {student_embedding.shape[1]}), "
            f"got {tuple(class_means.shape)}"
        )
    dtype = torch.promote_types(student_embedding.dtype, torch.float32)
    f_s = student_embedding.to(dtype)
    centers = class_means.to(device=f_s.device, dtype=dtype)[target]
    unit_centers = centers / centers.norm(dim=1, keepdim=True)
    teacher_norms = teacher_embedding.to(dtype)
    teacher_norms = teacher_norms if per_sample else teacher_norms.norm(dim=1)
    norms = torch.maximum(f_s.norm(dim=1), teacher_norms)
    return (1.0 - (f_s * unit_centers).sum(dim=1) / norms).mean()
