"""The classification contracts: a timm student, and a timm student with a frozen teacher.

:class:`ClassificationModule` (over the root :class:`~kdzoo.methods.module.KDZooModule`, which
owns the optimiser, the weighted loss terms and the checkpoint declarations) adds the timm
student and the evaluation metrics (torchmetrics, synchronised across DDP ranks).
:class:`DistillationModule` adds the teacher contract: built from a :class:`TeacherSpec`, frozen,
in eval mode for ever, run without autograd, and left out of checkpoints (it is rebuilt from the
config when a checkpoint is loaded). Modelled on ``timm/task/distillation.py``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection

from kdzoo.cache import CachedTeacher
from kdzoo.cache.adapters import ClassifierTeacher
from kdzoo.errors import ConfigError
from kdzoo.methods.module import Deployable, KDZooModule
from kdzoo.models.backbone import Backbone, BackboneOutput
from kdzoo.models.teacher import Teacher, TeacherSpec, build_teacher

__all__ = ["ClassificationModule", "DistillationModule"]


class ClassificationModule(KDZooModule):
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
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, optimizer=optimizer, scheduler=scheduler, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.student = Backbone(
            student,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=student_pretrained,
            model_kwargs=student_kwargs,
        )
        self.val_metrics = self.accuracy_metrics(num_classes, prefix="val/")
        self.test_metrics = self.accuracy_metrics(num_classes, prefix="test/")

    # ---- what a method provides -------------------------------------------------------------
    @abstractmethod
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms for one training batch, keyed by name."""

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

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        """The student as the plain timm model it is (:class:`~kdzoo.models.backbone.Backbone`
        keeps it under ``student.model``)."""
        architecture = hparams["student"]
        model_args = {
            "in_chans": int(hparams.get("in_chans") or 3),
            **dict(hparams.get("student_kwargs") or {}),
        }
        num_classes = int(hparams["num_classes"])
        network = timm.create_model(architecture, num_classes=num_classes, **model_args)
        return Deployable(network, "student.model.", architecture, model_args)


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
    #: What the method reads from the teacher, so that a teacher-output cache
    #: (``teacher.cache``) can be checked to hold it: ``logits``, ``embedding_norm``,
    #: ``embedding_class_means``, ``softmax_class_means`` (see :mod:`kdzoo.cache`).
    teacher_outputs: tuple[str, ...] = ("logits",)

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
        self.teacher: Teacher | CachedTeacher
        if teacher.cache is not None:
            self.teacher = CachedTeacher(
                teacher.cache,
                weights=teacher.weights,
                name=teacher.name,
                num_classes=teacher.num_classes or hp.num_classes,
                needs=self.teacher_outputs,
                method=type(self).__name__,
            )
            hp.teacher = {**asdict(teacher), "name": self.teacher.name}
            return
        # Building the teacher never moves torch's RNG (forked): what is drawn after it (the
        # method's own layers, the loader seeds) is the same with a live teacher, a cached one
        # (never built) or none.
        with torch.random.fork_rng(devices=[]):
            self.teacher = build_teacher(
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
        hp.teacher = {**asdict(teacher), "name": self.teacher.name}

    def result_names(self) -> dict[str, str]:
        return {"student": self.hparams.student, "teacher": self.hparams.teacher["name"]}

    @property
    def teacher_cached(self) -> bool:
        """Whether the teacher's outputs come from a cache (``teacher.cache``)."""
        return isinstance(self.teacher, CachedTeacher)

    def setup(self, stage: str) -> None:
        if self.teacher_cached and stage == "fit":
            self.teacher.check_run(self.trainer.datamodule, self.trainer.max_epochs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.teacher_cached:  # which samples, in which epoch, the cache must give
            self.teacher.select_batch(batch, self.current_epoch, items=3)

    def cache_adapter(self) -> ClassifierTeacher:
        """How ``kdzoo cache build`` runs and records this method's (live) teacher."""
        return ClassifierTeacher(self.teacher, self.hparams.teacher, type(self).__name__)

    def teacher_forward(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> BackboneOutput:
        """The teacher's outputs for the student's batch (no autograd, eval mode): computed, or
        read from the teacher cache for the batch's samples in this epoch."""
        return self.teacher(x, indices=indices)
