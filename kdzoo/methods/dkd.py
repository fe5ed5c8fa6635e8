"""Decoupled knowledge distillation (DKD).

Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation". CVPR 2022, arXiv:2203.08679.
Follows mdistiller's ``DKD`` distiller (github.com/megvii-research/mdistiller,
``mdistiller/distillers/DKD.py`` at ``e8c5bb3``), the official code:
``ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``.

Hyper-parameters from the code, which the paper's CIFAR-100 numbers come from: ``CE_WEIGHT 1``,
``ALPHA 1``, ``T 4``, ``WARMUP 20`` (of 240 epochs) and ``BETA 8``, overridden per pair in
``configs/cifar100/dkd/*.yaml``: 8 for ResNet-32x4 -> ResNet-8x4, ShuffleNet-V1/V2 students and
ResNet-50 -> MobileNetV2; 6 for the WRN-40-2 -> WRN-40-1 / WRN-16-2 and VGG-13 pairs; 2 for
ResNet-56 -> ResNet-20 and ResNet-110 -> ResNet-32. ImageNet (``configs/imagenet/*/dkd.yaml``):
``T 1``, ``WARMUP 1``, ``BETA 0.5`` (ResNet-34 -> ResNet-18) or 2 (ResNet-50 -> MobileNetV1).

The warm-up follows the code: mdistiller's trainer (``mdistiller/engine/trainer.py``) counts
epochs from 1, so its factor ``epoch / warmup`` is already ``1 / warmup`` in the first epoch and
reaches 1 in epoch ``warmup`` (1-based). Lightning counts from 0, hence
``(current_epoch + 1) / warmup_epochs`` here, and ``warmup_epochs: 1`` means no warm-up (as
mdistiller's ImageNet ``WARMUP: 1``). The ND code (kdzoo spec, section 1.1) counts from 0 instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo.losses.functional import dkd_loss
from kdzoo.methods.base import DistillationModule
from kdzoo.models.teacher import TeacherSpec
from kdzoo.validation import check_non_negative, check_positive

__all__ = ["DKD"]


class DKD(DistillationModule):
    """Student trained on labels and on the teacher's decoupled target / non-target knowledge.

    The ``"dkd"`` term is logged unweighted; its weight ``loss_weights["dkd"]`` is the warm-up
    factor ``min((current_epoch + 1) / warmup_epochs, 1)`` (1 when ``warmup_epochs == 0``), set at
    the start of every training epoch by :meth:`on_train_epoch_start`. ``alpha`` and ``beta``
    scale the term inside :func:`~kdzoo.losses.functional.dkd_loss`, so there is no separate
    DKD weight.

    Args:
        teacher: the frozen teacher (architecture + weights).
        temperature: softening temperature ``T`` of :func:`~kdzoo.losses.functional.dkd_loss`.
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        ce_weight: weight of the cross-entropy with the labels.
        warmup_epochs: epochs over which the DKD weight ramps up linearly, mdistiller-style.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation". CVPR 2022, '
        "arXiv:2203.08679"
    )
    description = "decoupled target / non-target KD"

    def __init__(
        self,
        teacher: TeacherSpec,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher=teacher, **kwargs)
        check_positive(temperature=temperature)
        check_non_negative(alpha=alpha, beta=beta, ce_weight=ce_weight, warmup_epochs=warmup_epochs)
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        self.loss_weights = {"ce": ce_weight, "dkd": self.warmup_factor(0)}

    def warmup_factor(self, epoch: int) -> float:
        """Weight of the DKD term in (0-based) ``epoch``: mdistiller's ``min(epoch / warmup, 1)``
        with its 1-based epoch."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((epoch + 1) / self.warmup_epochs, 1.0)

    def on_train_epoch_start(self) -> None:
        self.loss_weights["dkd"] = self.warmup_factor(self.current_epoch)

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        student_logits = self.student(images).logits
        teacher_logits = self.teacher_forward(images).logits
        return {
            "ce": F.cross_entropy(student_logits.float(), target),
            "dkd": dkd_loss(
                student_logits,
                teacher_logits,
                target,
                alpha=self.alpha,
                beta=self.beta,
                temperature=self.temperature,
            ),
        }
