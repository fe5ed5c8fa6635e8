"""DIST: knowledge distillation from a stronger teacher by matching prediction relations.

Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher". NeurIPS 2022,
arXiv:2205.10536. Official code: github.com/hunto/DIST_KD (``classification/``, whose ``KDLoss``
computes ``ori_loss_weight * CE + kd_loss_weight * DIST(beta=1, gamma=1, tau)``); the loss is
:func:`~kdzoo.losses.functional.dist_loss`, see there for what was checked against which file.

Defaults are the code's ``DIST(beta=1, gamma=1)`` with ``tau = 4`` (the ``dist_t4`` option used on
CIFAR-100) and unit CE / KD weights. The official CIFAR-100 recipe
(``configs/strategies/distill/dist_cifar.yaml``, read in a copy in the author's LocalMamba
repository) sets ``kd_loss_weight: 2``, i.e. ``kd_weight = 2``, which is the same loss as
``beta = gamma = 2``: the "DIST baseline: alpha_CE = 1, beta = 2, gamma = 2, tau = 4" that PLD
reports on CIFAR-100 (kdzoo spec, section 2.3). The code's plain ``dist`` option, used on
ImageNet, is ``tau = 1``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo.losses.functional import dist_loss
from kdzoo.methods.base import DistillationModule
from kdzoo.models.teacher import TeacherSpec
from kdzoo.validation import check_non_negative, check_positive

__all__ = ["DIST"]


class DIST(DistillationModule):
    """Student trained on labels and on the teacher's inter- and intra-class prediction relations.

    Args:
        teacher: the frozen teacher (architecture + weights).
        temperature: softening temperature ``T`` of :func:`~kdzoo.losses.functional.dist_loss`.
        beta: weight of the inter-class relation (Pearson correlation per sample).
        gamma: weight of the intra-class relation (Pearson correlation per class over the batch).
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of the whole DIST term (the code's ``kd_loss_weight``).
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher". NeurIPS '
        "2022, arXiv:2205.10536"
    )
    description = "inter- and intra-class relation KD"

    def __init__(
        self,
        teacher: TeacherSpec,
        temperature: float = 4.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher=teacher, **kwargs)
        check_positive(temperature=temperature)
        check_non_negative(beta=beta, gamma=gamma, ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature = temperature
        self.beta = beta
        self.gamma = gamma
        self.loss_weights = {"ce": ce_weight, "dist": kd_weight}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        student_logits = self.student(images).logits
        teacher_logits = self.teacher_forward(images).logits
        return {
            "ce": F.cross_entropy(student_logits.float(), target),
            "dist": dist_loss(
                student_logits,
                teacher_logits,
                beta=self.beta,
                gamma=self.gamma,
                temperature=self.temperature,
            ),
        }
