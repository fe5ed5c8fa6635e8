"""Plackett-Luce distillation (PLD).

Bassam, Zhu, Bian. "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (Plackett-Luce
Distillation). NeurIPS 2025, arXiv:2506.12542 (v3). No official code is public; the loss follows
the paper's objective (section 4), gradient (Appendix A) and reference implementation described
in Appendix C, see :func:`kdzoo.losses.functional.pld.pld_loss`.

What follows the paper: PLD is the whole training loss (it replaces CE + KD, whose ``k = 1`` term
is the teacher-weighted cross-entropy), computed on raw (unsoftened) student logits with teacher
softmax weights at temperature ``T``. The paper's best ``T`` on ImageNet-1K is 1.0 (Table 6:
0.5 / 1.0 / 1.5 / 2.0 / 4.0 give 76.06 / 77.30 / 77.17 / 76.46 / 75.22 top-1 for ResNet-152 ->
ResNet-50), the default here; its CIFAR-100 runs used 4.0, the temperature of its DIST baseline.
``weighting="uniform"`` is its "PLD-ListMLE" ablation (74.11 on the same pair). The ``pld_weight``
knob is kdzoo's (the paper has none); 1.0 is the paper's loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.pld import pld_loss
from kdzoo.methods.base import DistillationModule
from kdzoo.models.teacher import TeacherSpec
from kdzoo.validation import check_positive

__all__ = ["PLD"]


class PLD(DistillationModule):
    """Student trained to rank the label first and the other classes as the teacher does.

    The only loss term is ``"pld"`` (no separate cross-entropy). Teacher and student must predict
    the same classes (``same_label_space``): the base class raises a
    :class:`~kdzoo.errors.ConfigError` naming both class counts otherwise.

    Args:
        teacher: the frozen teacher (architecture + weights), over the student's classes.
        temperature: teacher temperature ``T`` of the PLD weights (student logits are never
            scaled). Paper: 1.0 on ImageNet-1K (its best), 4.0 on CIFAR-100.
        pld_weight: weight of the PLD term; 1.0 is the paper's loss.
        weighting: ``"teacher"`` (PLD) or ``"uniform"`` (the paper's PLD-ListMLE ablation).
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Bassam, Zhu, Bian. "PLD: A Choice-Theoretic List-Wise Knowledge Distillation". NeurIPS '
        "2025, arXiv:2506.12542"
    )
    description = "Plackett-Luce list-wise KD"

    def __init__(
        self,
        teacher: TeacherSpec,
        temperature: float = 1.0,
        pld_weight: float = 1.0,
        weighting: Literal["teacher", "uniform"] = "teacher",
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher=teacher, **kwargs)
        check_positive(temperature=temperature)
        if pld_weight <= 0:
            raise ConfigError(
                f"pld_weight must be > 0, got {pld_weight}: PLD is the only loss term of this "
                "method, so the student would not be trained"
            )
        self.temperature = temperature
        self.weighting = weighting
        self.loss_weights = {"pld": pld_weight}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        student_logits = self.student(images).logits
        teacher_logits = self.teacher_forward(images).logits
        return {
            "pld": pld_loss(
                student_logits,
                teacher_logits,
                target,
                temperature=self.temperature,
                weighting=self.weighting,
            )
        }
