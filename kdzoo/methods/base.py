"""The contracts every kdzoo method builds on.

:class:`ClassificationModule` owns the student, the injected optimiser and scheduler, the
evaluation metrics (torchmetrics, synchronised across DDP ranks) and the weighted sum and logging
of the named loss terms a method returns from :meth:`~ClassificationModule.loss_terms`.
:class:`DistillationModule` adds the teacher contract: built from a :class:`TeacherSpec`, frozen,
in eval mode for ever, run without autograd, and left out of checkpoints (it is rebuilt from the
config when a checkpoint is loaded). Modelled on ``timm/task/distillation.py``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kdzoo.errors import ConfigError
from kdzoo.models.backbone import Backbone, BackboneOutput
from kdzoo.models.teacher import Teacher, TeacherSpec, build_teacher

__all__ = [
    "ClassificationModule",
    "DistillationModule",
    "exclude_teacher_from_checkpoints",
    "weighted_loss",
]

_TEACHER_PREFIX = "teacher."
# A frozen teacher is in eval mode on purpose; Lightning warns about any module in eval mode.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")


class ClassificationModule(L.LightningModule, ABC):
    """A timm student trained from named, weighted loss terms; evaluated by top-1/top-5 accuracy.

    Subclasses implement :meth:`loss_terms` (a ``dict`` of unweighted scalar losses) and set
    :attr:`loss_weights` (one weight per term name). ``num_classes``, ``in_chans``, ``mean`` and
    ``std`` are linked from the datamodule by the CLI.

    Args:
        student: timm architecture of the trained network.
        num_classes: classifier outputs (linked from ``data.num_classes``).
        in_chans: input channels (linked from ``data.in_chans``).
        mean: input normalisation mean of the data pipeline (linked from ``data.mean``).
        std: input normalisation std (linked from ``data.std``).
        student_pretrained: start from timm's pretrained weights (needs a network).
        student_kwargs: extra ``timm.create_model`` arguments (``drop_rate``, ...).
        optimizer: optimiser factory, e.g. ``torch.optim.SGD`` with its init args in YAML.
        scheduler: optional learning-rate scheduler factory (stepped every epoch).
    """

    def __init__(
        self,
        student: str,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        student_pretrained: bool = False,
        student_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.student = Backbone(
            student,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=student_pretrained,
            model_kwargs=student_kwargs,
        )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_weights: dict[str, float] = {}
        top_k = min(5, num_classes)
        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                f"top{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ---- what a method provides -------------------------------------------------------------
    @abstractmethod
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms for one training batch, keyed by name."""

    # ---- training: weighted sum and logging, written once ------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return weighted_loss(self, self.loss_terms(batch), _batch_size(batch))

    # ---- evaluation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student logits (what a deployed model returns)."""
        return self.student(x).logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, Sequence) else batch
        probs = self(images).float().softmax(dim=-1)
        return {"probs": probs, "prediction": probs.argmax(dim=-1)}

    def _evaluate(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, target = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), target)
        metrics.update(logits, target)
        # sync_dist averages the per-rank loss; the accuracy metrics sync their states themselves.
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(target))
        self.log_dict(metrics, prog_bar=True)

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}


class DistillationModule(ClassificationModule):
    """A :class:`ClassificationModule` with a frozen teacher.

    The teacher is built in ``__init__`` from ``teacher`` (so a checkpoint never needs to hold
    it), is kept in eval mode and out of autograd by :class:`~kdzoo.models.teacher.Teacher`, and
    its keys are removed from every ``state_dict`` and tolerated as missing on load.

    Args:
        teacher: where the teacher comes from (architecture + weights).
        *args, **kwargs: see :class:`ClassificationModule`.
    """

    #: Whether the method compares teacher and student outputs class by class. When False,
    #: a teacher without ``num_classes`` keeps the number of classes its weights record.
    same_label_space: bool = True

    def __init__(self, teacher: TeacherSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(teacher, Mapping):  # as stored in a checkpoint's hyper-parameters
            teacher = TeacherSpec(**teacher)
        hp = self.hparams
        if self.same_label_space and teacher.num_classes not in (None, hp.num_classes):
            raise ConfigError(
                f"{type(self).__name__} needs teacher and student to predict the same classes, "
                f"but teacher.num_classes={teacher.num_classes} and the data has "
                f"{hp.num_classes}: remove teacher.num_classes (the teacher must be trained on "
                "this data's classes)"
            )
        self.teacher: Teacher = build_teacher(
            teacher,
            num_classes=hp.num_classes,
            in_chans=hp.in_chans,
            student_mean=self.mean,
            student_std=self.std,
            same_label_space=self.same_label_space,
            requirement=(
                f"{type(self).__name__}: teacher and student must predict the same classes"
                if self.same_label_space
                else None
            ),
        )
        # Plain data in the checkpoint, so `torch.load(weights_only=True)` can read it back;
        # with the architecture read from the weights when teacher.name was left out.
        hp.teacher = {**asdict(teacher), "name": self.teacher.backbone.name}
        exclude_teacher_from_checkpoints(self)

    def teacher_forward(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> BackboneOutput:
        """The teacher's outputs for the student's batch (no autograd, eval mode)."""
        return self.teacher(x, indices=indices)


def weighted_loss(
    module: L.LightningModule, terms: Mapping[str, torch.Tensor], batch_size: int | None
) -> torch.Tensor:
    """``sum(module.loss_weights[name] * term)``, each term logged as ``train/loss_<name>`` and
    the sum as ``train/loss``: the training step of every kdzoo method, written once."""
    unknown = set(terms) - set(module.loss_weights)
    if unknown:
        raise KeyError(f"{type(module).__name__} returned loss terms without a weight: {unknown}")
    loss = sum(module.loss_weights[name] * value for name, value in terms.items())
    for name, value in terms.items():
        module.log(f"train/loss_{name}", value.detach(), batch_size=batch_size)
    module.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
    return loss


def exclude_teacher_from_checkpoints(module: torch.nn.Module) -> None:
    """Leave every ``teacher.*`` key of ``module`` out of its state dicts (hence checkpoints) and
    tolerate those keys missing on load; for methods whose ``self.teacher`` is rebuilt from the
    config (one :class:`Teacher`, or e.g. an ``nn.ModuleList`` of them)."""
    module._register_state_dict_hook(_drop_teacher_keys)
    module.register_load_state_dict_post_hook(_allow_missing_teacher_keys)


def _drop_teacher_keys(module: Any, state_dict: Mapping, prefix: str, local_metadata: Any) -> None:
    # Teacher weights come from the config on every load; saving them would bloat checkpoints
    # and could leak a private teacher into a published student.
    for key in [k for k in state_dict if k.startswith(prefix + _TEACHER_PREFIX)]:
        del state_dict[key]


def _allow_missing_teacher_keys(module: Any, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(_TEACHER_PREFIX)]


def _batch_size(batch: Any) -> int | None:
    first = batch[0] if isinstance(batch, Sequence) else batch
    return len(first) if torch.is_tensor(first) else None
