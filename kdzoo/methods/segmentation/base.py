"""The contract every kdzoo segmentation method builds on.

:class:`SegmentationModule` (over the root :class:`~kdzoo.methods.module.KDZooModule`, which owns
the optimiser and the weighted loss terms) adds the student (a
:class:`~kdzoo.models.segmentation.SegmentationModel`: a timm ``features_only`` backbone with an
FCN / DeepLabV3 / PSP / FPN head and an auxiliary FCN head), a learning-rate multiplier for the
heads (as both CIRKD/LAD and FST use), and the evaluation: mean IoU and pixel accuracy over a
confusion matrix (torchmetrics, synchronised across DDP ranks), ignore index 255, logits upsampled
bilinearly to the label size. Batches are ``(images, masks)``; semi-supervised and
domain-adaptation methods get ``{"labelled": ..., "unlabelled": ...}``.

:class:`SegTeacherSpec` and :func:`build_seg_teacher` give the frozen segmentation teacher of
:class:`~kdzoo.methods.segmentation.segkd.SegKD`, its architecture read from the checkpoint of
the kdzoo run that trained it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from kdzoo.errors import ConfigError
from kdzoo.methods.module import Deployable, KDZooModule
from kdzoo.metrics import MeanIoU, PixelAccuracy
from kdzoo.models.segmentation import SegmentationModel, SegmentationOutput
from kdzoo.models.teacher import RANDOM_INIT, Teacher, resolve_weights
from kdzoo.models.weights import load_backbone_state, load_strictly
from kdzoo.validation import check_positive

__all__ = [
    "SegTeacherSpec",
    "SegmentationLogits",
    "SegmentationModule",
    "build_seg_teacher",
    "segmentation_architecture",
    "upsample",
]

IGNORE_INDEX = 255


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, h, w)`` logits to ``size`` (mmseg's ``align_corners=False``;
    CIRKD/LAD use ``True``, which shifts the map by half a feature pixel)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(
    output: SegmentationOutput, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of the main and (if any) auxiliary logits, upsampled to the masks."""
    size = masks.shape[-2:]
    ce = F.cross_entropy(upsample(output.logits, size).float(), masks, ignore_index=ignore_index)
    if output.aux is None:
        return ce, None
    aux = F.cross_entropy(upsample(output.aux, size).float(), masks, ignore_index=ignore_index)
    return ce, aux


def segmentation_architecture(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SegmentationModel` arguments recorded in a segmentation run's
    hyper-parameters (its student; for a :class:`~kdzoo.methods.segmentation.lad.LADTeacher`
    run, the label-assisted teacher)."""
    return {
        "backbone": hparams["student"],
        "num_classes": hparams["num_classes"],
        "head": hparams.get("head", "deeplabv3"),
        "in_chans": hparams.get("in_chans", 3),
        "extra_in_chans": hparams.get("extra_in_chans", 0),
        "output_stride": hparams.get("output_stride", 8),
        "aux_head": hparams.get("aux_head", True),
        "head_channels": hparams.get("head_channels"),
        "dropout": hparams.get("dropout", 0.1),
        "backbone_kwargs": hparams.get("student_kwargs"),
    }


class SegmentationModule(KDZooModule):
    """A segmentation student trained from named, weighted loss terms; evaluated by mIoU.

    Subclasses implement :meth:`loss_terms` and set :attr:`loss_weights`. ``num_classes``,
    ``in_chans``, ``mean`` and ``std`` are linked from the datamodule by the CLI.

    Args:
        student: timm backbone of the trained network (any name with ``features_only``).
        num_classes: classes of the masks (linked from ``data.num_classes``).
        head: ``"fcn"``, ``"deeplabv3"`` (ASPP), ``"psp"`` or ``"fpn"``.
        in_chans: image channels (linked from ``data.in_chans``).
        mean: input normalisation mean (linked from ``data.mean``).
        std: input normalisation std (linked from ``data.std``).
        output_stride: backbone output stride (8 or 16 with dilation; ``None``: the backbone's).
        aux_head: add the auxiliary FCN head on the second-to-last stage.
        aux_weight: weight of the auxiliary cross-entropy (0.4 in CIRKD, LAD's teacher, U2PL).
        head_channels: width of the heads (``None``: the model's default).
        dropout: dropout before the heads' classifiers.
        extra_in_chans: input channels after the image ones (LAD's label channel); the first
            convolution is widened with only the new slice initialised.
        student_pretrained: start the backbone from timm's pretrained weights (needs a network).
        student_kwargs: extra ``timm.create_model`` arguments for the backbone.
        init_weights: start the whole student (backbone and heads) from this checkpoint of a
            kdzoo segmentation run with the same architecture (e.g. self-training from a
            supervised model, where the papers start from ImageNet weights).
        head_lr_mult: learning-rate multiplier of the head parameters (10 in CIRKD and FST).
        ignore_index: mask value left out of losses and metrics.
        optimizer: optimiser factory, e.g. ``torch.optim.SGD`` with its init args in YAML.
        scheduler: optional learning-rate scheduler factory (e.g. ``PolynomialLR``, power 0.9).
        scheduler_interval: ``"step"`` (per iteration, segmentation's poly schedule) or
            ``"epoch"``.
    """

    checkpoint_metric = "val/miou"

    def __init__(
        self,
        student: str,
        num_classes: int,
        head: str = "deeplabv3",
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output_stride: int | None = 8,
        aux_head: bool = True,
        aux_weight: float = 0.4,
        head_channels: int | None = None,
        dropout: float = 0.1,
        extra_in_chans: int = 0,
        student_pretrained: bool = False,
        student_kwargs: dict[str, Any] | None = None,
        init_weights: str | None = None,
        head_lr_mult: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, optimizer=optimizer, scheduler=scheduler, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_positive(head_lr_mult=head_lr_mult)
        self.scheduler_interval = scheduler_interval
        self.ignore_index = ignore_index
        architecture = segmentation_architecture(self.hparams)
        self.student = SegmentationModel(**architecture, pretrained=student_pretrained)
        if init_weights is not None:
            path, _ = resolve_weights(init_weights)
            _load_segmentation_weights(self.student, path, architecture, role="init_weights")
        metrics = MetricCollection(
            {
                "miou": MeanIoU(num_classes, ignore_index=ignore_index),
                "pixel_acc": PixelAccuracy(num_classes, ignore_index=ignore_index),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ---- what a method provides -------------------------------------------------------------
    @abstractmethod
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms for one training batch, keyed by name."""

    def supervised_terms(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
        """``ce`` (and ``aux``) of the student on a labelled batch, plus its ``output``."""
        output = self.student(images)
        ce, aux = segmentation_loss(output, masks, self.ignore_index)
        terms = {"ce": ce} if aux is None else {"ce": ce, "aux": aux}
        return {"terms": terms, "output": output}

    # ---- evaluation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input's size (what a deployed model returns)."""
        return upsample(self.eval_model()(x).logits, x.shape[-2:])

    def eval_model(self) -> SegmentationModel:
        """The network evaluated and deployed (the student; FST may evaluate its teacher)."""
        return self.student

    def eval_logits(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits evaluated against ``masks`` (methods with privileged inputs override)."""
        return self.eval_model()(images).logits

    def on_validation_epoch_start(self) -> None:
        self._share_rank_zero_buffers()

    def on_test_epoch_start(self) -> None:
        self._share_rank_zero_buffers()

    def _share_rank_zero_buffers(self) -> None:
        """Every process evaluates with rank 0's BatchNorm statistics, the ones checkpointed.

        DDP broadcasts buffers at the forward after a backward only; FST's several backward
        passes per step leave each process with statistics of its own data, so a synced metric
        would mix several models.
        """
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for buffer in self.eval_model().buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, Sequence) else batch
        return {"prediction": self(images).argmax(dim=1)}

    def _evaluate(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, masks = batch[0], batch[1]
        logits = upsample(self.eval_logits(images, masks), masks.shape[-2:])
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        metrics.update(logits, masks)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(masks))
        self.log_dict(metrics, prog_bar=True)

    # ---- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone and heads as two groups; the heads' lr is ``head_lr_mult`` times larger
        (the optimiser's ``lr`` is read back from a probe instance)."""
        backbone = [p for p in self.student.backbone_parameters() if p.requires_grad]
        heads = [p for p in self.student.head_parameters() if p.requires_grad]
        mult = self.hparams.head_lr_mult
        if mult == 1.0:
            return [{"params": backbone + heads}]
        base_lr = self.optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"]
        return [{"params": backbone}, {"params": heads, "lr": base_lr * mult}]

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        architecture = segmentation_architecture(hparams)
        network = SegmentationModel(**architecture)
        reason = (
            f"a segmentation network ({architecture['backbone']} timm backbone + kdzoo "
            f"{architecture['head']} head) returning per-pixel class logits at the input size"
        )
        return Deployable(
            network,
            prefix="student.",
            model_args={"in_chans": architecture["in_chans"] + architecture["extra_in_chans"]},
            reason=reason,
            backbone=str(architecture["backbone"]).split(".")[0],
            predictor=SegmentationLogits(network),
            any_size=True,
        )

    def result_names(self) -> dict[str, str]:
        return {"student": f"{self.hparams.student}/{self.hparams.head}", "teacher": ""}


class SegmentationLogits(nn.Module):
    """The deployed segmentation network: ``forward(x)`` gives per-pixel class logits at the
    size of ``x`` (as :meth:`SegmentationModule.forward`), the auxiliary head not run."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Backbone and main head only: the auxiliary head is a training loss, and leaving it out
        # keeps the deployed cost (and the ONNX graph) what inference needs.
        logits = self.model.head(self.model.backbone(x))
        return upsample(logits, x.shape[-2:])


@dataclass
class SegTeacherSpec:
    """Where a segmentation teacher comes from.

    Attributes:
        weights: the ``.ckpt`` of the kdzoo run that trained it (``SegSupervised``,
            ``LADTeacher``, ...): its architecture, label encoding and normalisation are read from
            the checkpoint's hyper-parameters. A ``.safetensors`` or ``torch.save``-d state dict
            also works when ``architecture`` is given. Required (``None`` is an error);
            ``"random"`` keeps the random initialisation of ``architecture`` (tests only).
        architecture: :class:`~kdzoo.models.segmentation.SegmentationModel` arguments
            (``backbone``, ``head``, ``output_stride``, ``extra_in_chans``, ...) overriding those
            read from the checkpoint; required for plain weight files.
        mean: input mean the teacher expects (``None``: from the checkpoint, else the student's).
        std: as ``mean``.
    """

    weights: str | None = None
    architecture: dict[str, Any] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def build_seg_teacher(
    spec: SegTeacherSpec | Mapping[str, Any],
    *,
    num_classes: int,
    in_chans: int,
    student_mean: Sequence[float] | None,
    student_std: Sequence[float] | None,
) -> tuple[Teacher, dict[str, Any], dict[str, Any]]:
    """The frozen teacher ``spec`` describes, the hyper-parameters recorded with it and its
    resolved :class:`SegmentationModel` arguments."""
    if isinstance(spec, Mapping):
        spec = SegTeacherSpec(**spec)
    if spec.weights is None:
        raise ConfigError(
            "teacher has no weights: set --model.init_args.teacher.weights to the .ckpt of the "
            "kdzoo run that trained the segmentation teacher (or a weight file, with "
            f"teacher.architecture); `{RANDOM_INIT}` keeps the random initialisation (for tests "
            "only, with teacher.architecture)"
        )
    recorded: dict[str, Any] = {}
    path = None
    if spec.weights != RANDOM_INIT:
        path, recorded = resolve_weights(spec.weights)
    if "student" not in recorded and not (spec.architecture or {}).get("backbone"):
        raise ConfigError(
            f"teacher.weights={spec.weights!r} does not record a segmentation architecture: pass "
            "the .ckpt of the kdzoo run that trained the teacher, or set teacher.architecture "
            "(backbone, head, output_stride, ...)"
        )
    architecture = segmentation_architecture(recorded) if "student" in recorded else {}
    architecture.update(spec.architecture or {})
    architecture.setdefault("num_classes", num_classes)
    architecture.setdefault("in_chans", in_chans)
    if architecture["num_classes"] != num_classes:
        raise ConfigError(
            f"the teacher predicts {architecture['num_classes']} classes but the data has "
            f"{num_classes}: teacher and student must segment the same classes"
        )
    network = SegmentationModel(**architecture)
    if path is not None:
        _load_segmentation_weights(network, path, architecture)
    teacher = Teacher(
        network,
        student_mean=student_mean,
        student_std=student_std,
        teacher_mean=spec.mean or recorded.get("mean") or student_mean,
        teacher_std=spec.std or recorded.get("std") or student_std,
    )
    return teacher, recorded, architecture


def _load_segmentation_weights(
    network: SegmentationModel, path: str, architecture: Mapping[str, Any], role: str = "teacher"
) -> None:
    load_strictly(
        network,
        load_backbone_state(path),
        what=f"{role} weights {path}",
        into=f"the segmentation network ({architecture['backbone']} + {architecture['head']})",
        hint="Was it trained with this architecture?",
    )
