"""Logit distillation for semantic segmentation, from a plain or a label-assisted teacher.

The distillation half of LAD (Qiu et al., "Make a Strong Teacher with Label Assistance", ECCV
2024, arXiv:2407.13254; github.com/skyshoumeng/Label_Assisted_Distillation), usable with any kdzoo
segmentation teacher:

- loss ``CE(o_s) + aux_weight CE(a_s) + kd_weight KD(o_s <- o_t)``; the released LAD student
  run uses CWD at ``T = 4`` with ``kd_weight = 3`` and ``aux_weight = 0.02`` (configs set these);
  ``kd_loss: pixel_kd`` gives the pixel-wise KL variant commented out in the same file.
  CWD: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
  arXiv:2011.13256.
- a teacher trained by :class:`~kdzoo.methods.segmentation.lad.LADTeacher` (recorded in its
  checkpoint) gets the ground truth as its label channel in the *fixed* encoding with
  ``sigma = 0.02``, the code's distillation setting, with the scale it was trained with; a plain
  teacher gets the image only.
- the student is an ordinary network on the image channels. (The code's student is the same
  4-channel network fed a zero label channel, which is exactly a 3-channel network: spec oracle
  L1, tested.)
- teacher logits are resized bilinearly to the student's logit size when their output strides
  differ (CWD compares spatial distributions, so the two maps must align).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import channel_wise_distillation_loss, pixel_kd_loss
from kdzoo.methods.segmentation.base import (
    SegmentationModule,
    SegTeacherSpec,
    build_seg_teacher,
    upsample,
)
from kdzoo.methods.segmentation.lad import label_input
from kdzoo.methods.segmentation.supervised import labelled_batch
from kdzoo.validation import check_positive

__all__ = ["SegKD"]


class SegKD(SegmentationModule):
    """A segmentation student distilled from a frozen segmentation teacher.

    Args:
        teacher: the teacher's checkpoint (and optionally architecture / normalisation).
        kd_loss: ``"cwd"`` (channel-wise distillation, LAD's released choice) or ``"pixel_kd"``
            (pixel-wise KL at temperature ``T``, ignore pixels excluded).
        temperature: ``T`` of either loss (LAD: 4).
        kd_weight: weight of the distillation term (LAD with CWD: 3).
        teacher_label_sigma: pixel noise of a label-assisted teacher's fixed encoding (LAD: 0.02).
        **kwargs: see :class:`~kdzoo.methods.segmentation.base.SegmentationModule`.
    """

    citation = (
        'Shu, Liu, Gao, Yan, Shen. "Channel-wise Knowledge Distillation for Dense Prediction". '
        "ICCV 2021, arXiv:2011.13256"
    )
    description = "segmentation KD (CWD or pixel KD)"

    def __init__(
        self,
        teacher: SegTeacherSpec,
        kd_loss: Literal["cwd", "pixel_kd"] = "cwd",
        temperature: float = 4.0,
        kd_weight: float = 3.0,
        teacher_label_sigma: float = 0.02,
        **kwargs: Any,
    ) -> None:
        check_positive(temperature=temperature)
        super().__init__(**kwargs)
        if isinstance(teacher, Mapping):
            teacher = SegTeacherSpec(**teacher)
        if self.hparams.extra_in_chans:
            raise ConfigError(
                "a SegKD student sees the image only: leave extra_in_chans at 0 (the label "
                "channel belongs to the LAD teacher)"
            )
        self.hparams.teacher = asdict(teacher)
        self.teacher, recorded, architecture = build_seg_teacher(
            teacher,
            num_classes=self.hparams.num_classes,
            in_chans=self.hparams.in_chans,
            student_mean=self.mean,
            student_std=self.std,
        )
        # The resolved architecture, so the run's config and checkpoint say what the teacher was.
        self.hparams.teacher["architecture"] = architecture
        self.teacher_label_channels = self.teacher.backbone.extra_in_chans
        # The label scale the teacher was trained with (LADTeacher records it).
        self.teacher_label_scale = float(recorded.get("label_scale", 1.7))
        self.loss_weights = {"ce": 1.0, "aux": self.hparams.aux_weight, "kd": kd_weight}

    def result_names(self) -> dict[str, str]:
        teacher = self.hparams.teacher["architecture"]
        label = "+label" if teacher.get("extra_in_chans") else ""
        names = super().result_names()
        head = teacher.get("head", "deeplabv3")  # SegmentationModel's default
        return {**names, "teacher": f"{teacher['backbone']}/{head}{label}"}

    def teacher_logits(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits; a label-assisted teacher also sees the encoded masks."""
        if self.teacher_label_channels:
            encoding = {
                "mode": "fixed",
                "sigma": self.hparams.teacher_label_sigma,
                "scale": self.teacher_label_scale,
                "ignore_index": self.ignore_index,
            }
            images = label_input(images, masks, self.hparams.num_classes, **encoding)
        return self.teacher(images).logits

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, masks = labelled_batch(batch, type(self).__name__)
        supervised = self.supervised_terms(images, masks)
        student = supervised["output"].logits
        teacher = upsample(self.teacher_logits(images, masks), student.shape[-2:])
        temperature = self.hparams.temperature
        if self.hparams.kd_loss == "cwd":
            kd = channel_wise_distillation_loss(student, teacher, temperature=temperature)
        else:
            kd = pixel_kd_loss(
                student,
                teacher,
                temperature=temperature,
                ignore_index=self.ignore_index,
                target=masks,
            )
        return {**supervised["terms"], "kd": kd}
