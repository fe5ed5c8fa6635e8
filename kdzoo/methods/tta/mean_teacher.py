"""``MeanTeacher``: self-training of a student towards its exponential-moving-average teacher.

The plain mean teacher of continual test-time adaptation, the reference baseline of CoTTA (Wang et
al. "Continual Test-Time Domain Adaptation", CVPR 2022, arXiv:2203.13591) and RMT (Döbler et al.
"Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR 2023,
arXiv:2211.13081); the teacher idea is Tarvainen and Valpola, "Mean teachers are better role
models", NeurIPS 2017, arXiv:1703.01780. kdzoo spec ``tta.md`` section 3.1: in the benchmark
github.com/mariodoebler/test-time-adaptation it is exactly ``methods/cotta.py`` with
``COTTA.RST 0`` and ``COTTA.AP 0`` (no augmentation averaging, no restore), which is how it is
written here; ``loss="sce"`` gives the benchmark's ImageNet form (MT-SCE).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from kdzoo.losses.functional import soft_cross_entropy, symmetric_cross_entropy
from kdzoo.methods.tta.base import TTAModule, ema_update
from kdzoo.validation import check_fraction

__all__ = ["MeanTeacher", "frozen_copy", "self_training_loss"]

SelfTrainingLoss = Literal["ce", "sce"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the *configured* model (so it also normalises with batch statistics), in
    eval mode and out of autograd: a teacher or anchor that never receives gradients."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def self_training_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: SelfTrainingLoss
) -> torch.Tensor:
    """``"ce"``: mean ``CE(softmax(t) -> s)`` (CIFAR); ``"sce"``: mean
    ``0.5 CE(softmax(t) -> s) + 0.5 CE(softmax(s) -> t)`` (ImageNet). Teacher detached."""
    if kind == "ce":
        return soft_cross_entropy(student_logits, teacher_logits)
    return symmetric_cross_entropy(student_logits, teacher_logits)


class MeanTeacher(TTAModule):
    """Student (all parameters trained) and EMA teacher, both starting from the source model.

    Per batch ``x``: teacher logits ``z_t = f_teacher(x)`` and student logits ``z_s = f(x)`` on the
    same un-augmented batch; loss ``mean_i CE(softmax(z_t,i) -> z_s,i)`` (or the symmetric form);
    one student step; then ``teacher <- m * teacher + (1 - m) * student`` over all parameters. The
    prediction is ``z_t``, computed before the step.

    Args:
        momentum: EMA momentum ``m`` of the teacher (the benchmark's 0.999; ``>= 1`` freezes it).
        loss: ``"ce"`` (the CIFAR configs) or ``"sce"`` (the ImageNet configs).
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    description = "mean-teacher test-time adaptation baseline"

    def __init__(self, momentum: float = 0.999, loss: SelfTrainingLoss = "ce", **kwargs: Any):
        super().__init__(**kwargs)
        check_fraction(momentum=momentum)
        self.momentum = momentum
        self.loss_kind = loss
        self.teacher = frozen_copy(self.model)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction :meth:`adapt` returns for ``images``, without adapting."""
        with torch.no_grad():
            return self.teacher(images).logits

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        target = self.teacher_logits(images)
        student = self(images)
        self.step_optimizer(self_training_loss(student, target, self.loss_kind))
        ema_update(self.teacher, self.model, self.momentum)
        return target
