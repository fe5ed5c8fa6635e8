"""Vanilla knowledge distillation.

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". NIPS 2014 Deep Learning
Workshop, arXiv:1503.02531. The loss follows mdistiller's ``KD`` distiller
(github.com/megvii-research/mdistiller): ``ce_weight * CE + kd_weight * T^2 * KL``; mdistiller's
CIFAR-100 defaults are ``T = 4``, ``ce_weight = 0.1``, ``kd_weight = 0.9``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo.losses.functional import kd_loss
from kdzoo.methods.base import DistillationModule
from kdzoo.models.teacher import TeacherSpec
from kdzoo.validation import check_positive

__all__ = ["KD"]


class KD(DistillationModule):
    """Student trained on labels and on the teacher's temperature-softened class distribution.

    Args:
        teacher: the frozen teacher (architecture + weights).
        temperature: softening temperature ``T`` of :func:`~kdzoo.losses.functional.kd_loss`.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of the ``T^2``-scaled KL term.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". NIPS 2014 Deep '
        "Learning Workshop, arXiv:1503.02531"
    )
    description = "vanilla knowledge distillation"

    def __init__(
        self,
        teacher: TeacherSpec,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher=teacher, **kwargs)
        check_positive(temperature=temperature)
        self.temperature = temperature
        self.loss_weights = {"ce": ce_weight, "kd": kd_weight}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        student_logits = self.student(images).logits
        teacher_logits = self.teacher_forward(images).logits
        return {
            "ce": F.cross_entropy(student_logits.float(), target),
            "kd": kd_loss(student_logits, teacher_logits, temperature=self.temperature),
        }
