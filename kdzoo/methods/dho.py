"""Dual-head distillation (DHO): a student with a cross-entropy head and a distillation head.

Kang, Lee, Jang, Hwang. "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", arXiv:2505.07675 (official code
github.com/erjui/DHO); the per-round student of PCoreSet / ActiveKD (Kang et al., "PCoreSet:
Effective Active Learning through Knowledge Distillation from Vision-Language Models",
arXiv:2506.00910; github.com/erjui/PCoreSet, ``train_active_others.py: train_student``).

One timm backbone (``num_classes=0``: its pooled feature) feeds two linear heads. The CE head
learns from the labels only, the KD head from the teacher only, on labelled and unlabelled
images, so the two objectives never pull one head in two directions:

    L = ce_weight * CE(h_ce(x_l), y)
        + kd_weight * [T^2 KL(p_T(x_l) || softmax(h_kd(x_l) / T))
                       + T^2 KL(p_T(x_u) || softmax(h_kd(x_u) / T))],   p_T = softmax(z_T / T),

with the reference's ``T = 2`` and weights ``1/2``. Predictions fuse the heads:
``p~ = (1 - alpha) softmax(h_ce) + alpha softmax(h_kd / beta)`` (``alpha = 0.5, beta = 1``).

As in the reference, labelled and unlabelled images go through the student in two forward passes
(BatchNorm statistics of each batch separately), the KL is averaged over each batch
(``batchmean``), and the teacher sees the student's augmented batch. The teacher is a kdzoo
classifier (:class:`~kdzoo.models.teacher.TeacherSpec`) or a CLIP model
(:class:`~kdzoo.models.clip.CLIPTeacherSpec`, zero-shot or a fitted CLAP probe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import kd_loss
from kdzoo.methods.module import Deployable, KDZooModule
from kdzoo.models.clip import (
    CLIPTeacherSpec,
    build_clip_teacher,
    check_clip_weights,
    linear_warmup_decay,
)
from kdzoo.models.teacher import Teacher, TeacherSpec, build_teacher
from kdzoo.validation import check_at_least, check_fraction, check_non_negative, check_positive

__all__ = ["DualHeadDistillation"]

LABELLED, UNLABELLED = "labelled", "unlabelled"


class DualHeadDistillation(KDZooModule):
    """A timm student with a CE head and a KD head, distilled on labelled and unlabelled data.

    Training batches are ``{"labelled": (x, y), "unlabelled": (x_u, ...)}`` (a Lightning
    ``CombinedLoader`` of two loaders; the unlabelled entry may also be a bare tensor), or a
    plain ``(x, y)``, which distils on the labelled images only (the unlabelled KD term is then
    absent). Validation, test and predict batches are ``(x, y)``. ``val/top1`` and
    ``test/top1`` score the fused prediction ``combined_probs(alpha, beta)``; ``*/top1_ce`` and
    ``*/top1_kd`` score each head alone.

    The teacher is frozen, in eval mode, run without autograd and left out of checkpoints (it is
    rebuilt from the config on load), as for :class:`~kdzoo.methods.base.DistillationModule`.
    A CLIP teacher without ``class_names`` uses the ``class_names`` argument (which the CLI
    links from the datamodule), or else the datamodule's ``class_names`` when ``fit`` starts
    (``setup``); the names used are recorded in ``hparams.clip_teacher``, so a checkpoint
    rebuilds the same prompts.

    Args:
        student: timm architecture of the backbone (built with ``num_classes=0``).
        num_classes: outputs of each head (linked from ``data.num_classes``).
        teacher: a kdzoo/timm classifier teacher; give this or ``clip_teacher``.
        clip_teacher: a CLIP teacher (:class:`~kdzoo.models.clip.CLIPTeacherSpec`
            fields).
        in_chans: input channels (linked from ``data.in_chans``).
        mean: input normalisation mean of the data pipeline (linked from ``data.mean``).
        std: input normalisation std (linked from ``data.std``).
        student_pretrained: start the backbone from timm's pretrained weights (needs a network;
            the reference starts every round from ImageNet weights).
        student_kwargs: extra ``timm.create_model`` arguments.
        temperature: ``T`` of both KD terms and of the teacher's probabilities.
        ce_weight: weight of the CE term.
        kd_weight: weight of each of the two KD terms.
        alpha: weight of the KD head in the fused prediction, in ``[0, 1]``.
        beta: temperature of the KD head in the fused prediction, ``> 0``.
        optimizer: optimiser factory (AdamW, lr 1e-3, weight decay 0.01 by default, as the
            reference).
        scheduler: optional learning-rate scheduler factory (stepped every epoch).
        warmup_fraction: instead of ``scheduler``, the reference's per-step schedule: linear
            warm-up over this fraction of all training steps (0.1 in the reference), then linear
            decay to 0 at the last step.
        class_names: the data's class names (linked from ``data.class_names`` by the CLI), for
            a CLIP teacher whose ``class_names`` is unset; ignored with ``teacher``.
    """

    citation = (
        'Kang, Lee, Jang, Hwang. "Simple yet Effective Semi-supervised Knowledge Distillation '
        'from Vision-Language Models via Dual-Head Optimization". arXiv:2505.07675'
    )
    description = "dual-head distillation (DHO)"

    def __init__(
        self,
        student: str,
        num_classes: int,
        teacher: TeacherSpec | None = None,
        clip_teacher: CLIPTeacherSpec | None = None,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        student_pretrained: bool = False,
        student_kwargs: dict[str, Any] | None = None,
        temperature: float = 2.0,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        alpha: float = 0.5,
        beta: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        warmup_fraction: float | None = None,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, optimizer=optimizer, scheduler=scheduler, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_at_least(1, num_classes=num_classes)
        check_positive(temperature=temperature, beta=beta)
        check_non_negative(ce_weight=ce_weight, kd_weight=kd_weight)
        check_fraction(alpha=alpha)
        if (teacher is None) == (clip_teacher is None):
            raise ConfigError(
                "DualHeadDistillation needs exactly one teacher: set either teacher (a kdzoo "
                "classifier) or clip_teacher (a CLIP model), not both or neither"
            )
        if warmup_fraction is not None and (scheduler is not None or not 0 <= warmup_fraction < 1):
            raise ConfigError(
                f"warmup_fraction={warmup_fraction} needs a value in [0, 1) and no scheduler: "
                "use one of the two"
            )
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.loss_weights = {"ce": ce_weight, "kd_labelled": kd_weight, "kd_unlabelled": kd_weight}
        if warmup_fraction is not None:  # the reference's per-step warm-up and linear decay
            self.scheduler, self.scheduler_interval = self._warmup_decay, "step"

        self.student = _headless_student(student, in_chans, student_pretrained, student_kwargs)
        width = getattr(self.student, "head_hidden_size", None) or self.student.num_features
        self.ce_head = nn.Linear(width, num_classes)
        self.kd_head = nn.Linear(width, num_classes)

        self.teacher: Teacher | None = None  # frozen, eval for ever, out of checkpoints
        if teacher is not None:
            self._build_classifier_teacher(teacher)
        else:
            spec = (
                CLIPTeacherSpec(**clip_teacher)
                if isinstance(clip_teacher, Mapping)
                else clip_teacher
            )
            if in_chans not in (1, 3):
                raise ConfigError(f"a CLIP teacher takes 1 or 3 input channels, not {in_chans}")
            check_clip_weights(spec)  # now, not when the teacher is built at fit time
            # Plain data in the checkpoint, so `torch.load(weights_only=True)` can read it back.
            self.hparams.clip_teacher = asdict(spec)
            names = spec.class_names if spec.class_names is not None else class_names
            if names is not None:
                self._build_clip_teacher(list(names))

        top_k = min(5, num_classes)
        self.val_metrics = _metrics(num_classes, top_k)
        self.test_metrics = _metrics(num_classes, top_k)

    # ---- teachers -----------------------------------------------------------------------------
    def _build_classifier_teacher(self, spec: TeacherSpec | Mapping[str, Any]) -> None:
        spec = TeacherSpec(**spec) if isinstance(spec, Mapping) else spec
        hp = self.hparams
        if spec.num_classes not in (None, hp.num_classes):
            raise ConfigError(
                f"the teacher predicts {spec.num_classes} classes (teacher.num_classes) and the "
                f"data has {hp.num_classes}: DHO distils class by class, remove "
                "teacher.num_classes (the teacher must be trained on this data's classes)"
            )
        if spec.cache is not None:
            # A cache holds one view per (epoch, sample); DHO's labelled set is repeated to the
            # pool's length within an epoch, each repetition another augmentation, which one
            # stored view per epoch would collapse (exact replay keys views by sample).
            raise ConfigError(
                "teacher.cache is set, but DHO runs its teacher live: its labelled images are "
                "repeated within an epoch, each time augmented anew, and a teacher cache holds "
                "one view per sample and epoch; remove --model.init_args.teacher.cache"
            )
        self.teacher = build_teacher(
            spec,
            num_classes=hp.num_classes,
            in_chans=hp.in_chans,
            student_mean=self.mean,
            student_std=self.std,
            requirement="DHO distils class by class: teacher and student must predict the "
            "same classes",
        )
        # Plain data in the checkpoint, so `torch.load(weights_only=True)` can read it back;
        # with the architecture read from the weights when teacher.name was left out.
        self.hparams.teacher = {**asdict(spec), "name": self.teacher.backbone.name}

    def _build_clip_teacher(self, class_names: Sequence[str]) -> None:
        spec = CLIPTeacherSpec(**self.hparams.clip_teacher)
        if len(class_names) != self.hparams.num_classes:
            raise ConfigError(
                f"the CLIP teacher has {len(class_names)} class names and the data "
                f"{self.hparams.num_classes} classes: give one name per class"
            )
        teacher = build_clip_teacher(
            spec, class_names, student_mean=self.mean, student_std=self.std
        )
        self.teacher = teacher.to(self.ce_head.weight.device)
        self.hparams.clip_teacher["class_names"] = list(class_names)

    def setup(self, stage: str) -> None:
        if self.teacher is not None or stage != "fit":
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if not names:
            raise ConfigError(
                "the CLIP teacher needs class names: set clip_teacher.class_names, or train with "
                "a datamodule that has class_names"
            )
        self._build_clip_teacher(list(names))

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` teacher logits ``z_T`` for the student's batch ``x``."""
        if self.teacher is None:
            raise RuntimeError(
                "the CLIP teacher is built when fit starts (from the datamodule's class names); "
                "pass class_names or set clip_teacher.class_names to build it at construction"
            )
        out = self.teacher(x)  # a CLIP teacher gives logits, a classifier a BackboneOutput
        return out if torch.is_tensor(out) else out.logits

    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(z_T / T)``: the distribution the KD head is trained towards."""
        return (self.teacher_logits(x).float() / self.temperature).softmax(dim=-1)

    # ---- the student ------------------------------------------------------------------------
    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ce_logits, kd_logits, pooled_feature)`` of the student for images ``x``."""
        feature = self.student(x)
        return self.ce_head(feature), self.kd_head(feature), feature

    def combined_probs(
        self,
        ce_logits: torch.Tensor,
        kd_logits: torch.Tensor,
        alpha: float = 0.5,
        beta: float = 1.0,
    ) -> torch.Tensor:
        """``(1 - alpha) softmax(ce_logits) + alpha softmax(kd_logits / beta)`` (at least fp32).

        PCoreSet's selection rules fix ``alpha = 0.5, beta = 1`` (the defaults here); evaluation
        uses the module's ``alpha`` and ``beta``.
        """
        return fused_probs(ce_logits, kd_logits, alpha, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p~`` of the fused prediction: logits whose softmax is ``combined_probs``."""
        ce_logits, kd_logits, _ = self.heads(x)
        return fused_log_probs(ce_logits, kd_logits, self.alpha, self.beta)

    # ---- training -----------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted loss terms ``ce``, ``kd_labelled`` and (with unlabelled data)
        ``kd_unlabelled``; :attr:`loss_weights` holds their weights."""
        (x, y), x_u = _split_batch(batch)
        ce_logits, kd_logits, _ = self.heads(x)
        terms = {
            "ce": F.cross_entropy(ce_logits.float(), y),
            "kd_labelled": kd_loss(kd_logits, self.teacher_logits(x), temperature=self.temperature),
        }
        if x_u is not None and len(x_u) > 0:
            # A second forward pass, as the reference: BatchNorm normalises each batch alone.
            _, kd_logits_u, _ = self.heads(x_u)
            teacher_u = self.teacher_logits(x_u)
            terms["kd_unlabelled"] = kd_loss(kd_logits_u, teacher_u, temperature=self.temperature)
        return terms

    def batch_size(self, batch: Any) -> int:
        return len(_split_batch(batch)[0][1])

    # ---- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, Sequence) else batch
        ce_logits, kd_logits, _ = self.heads(images)
        probs = self.combined_probs(ce_logits, kd_logits, self.alpha, self.beta)
        return {"probs": probs, "prediction": probs.argmax(dim=-1)}

    def _evaluate(self, batch: Any, metrics: nn.ModuleDict, stage: str) -> None:
        images, target = batch[0], batch[1]
        ce_logits, kd_logits, _ = self.heads(images)
        probs = self.combined_probs(ce_logits, kd_logits, self.alpha, self.beta)
        log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        for name, metric in metrics.items():
            scores = {"top1_ce": ce_logits, "top1_kd": kd_logits}.get(name, probs)
            metric.update(scores, target)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "top1")
        # sync_dist averages the per-rank loss; the accuracy metrics sync their states themselves.
        loss = F.nll_loss(log_probs, target)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(target))

    # ---- optimisation -----------------------------------------------------------------------
    def _warmup_decay(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = linear_warmup_decay(steps, self.hparams.warmup_fraction)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        network = DualHeadStudent(
            _headless_student(
                hparams["student"],
                int(hparams.get("in_chans") or 3),
                False,
                hparams.get("student_kwargs"),
            ),
            int(hparams["num_classes"]),
            alpha=float(hparams.get("alpha", 0.5)),
            beta=float(hparams.get("beta", 1.0)),
        )
        reason = (
            f"a timm {hparams['student']} backbone with DHO's two heads, returning the log of "
            "their fused probabilities (logits whose softmax is the fused prediction)"
        )
        return Deployable(
            network,
            prefix="",
            model_args={"in_chans": int(hparams.get("in_chans") or 3)},
            reason=reason,
            backbone=str(hparams["student"]).split(".")[0],
        )

    def result_names(self) -> dict[str, str]:
        teacher = self.hparams.get("teacher") or {}
        return {"student": self.hparams.student, "teacher": teacher.get("name") or ""}


class DualHeadStudent(nn.Module):
    """The deployed DHO student: backbone, CE head and KD head (named as in the module, so a
    checkpoint's ``student.*``, ``ce_head.*``, ``kd_head.*`` load into it), returning what
    :meth:`DualHeadDistillation.forward` returns: ``log p~``, the log of the fused probabilities
    ``p~ = (1 - alpha) softmax(h_ce) + alpha softmax(h_kd / beta)``."""

    def __init__(self, student: nn.Module, num_classes: int, alpha: float, beta: float) -> None:
        super().__init__()
        width = getattr(student, "head_hidden_size", None) or student.num_features
        self.student = student
        self.ce_head = nn.Linear(width, num_classes)
        self.kd_head = nn.Linear(width, num_classes)
        self.alpha, self.beta = alpha, beta
        self.num_classes = num_classes
        # The backbone's input size and normalisation, where timm's data helpers look.
        self.pretrained_cfg = dict(getattr(student, "pretrained_cfg", None) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.student(x)
        return fused_log_probs(self.ce_head(feature), self.kd_head(feature), self.alpha, self.beta)


def fused_probs(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """``(1 - alpha) softmax(ce_logits) + alpha softmax(kd_logits / beta)`` (at least fp32)."""
    dtype = torch.promote_types(ce_logits.dtype, torch.float32)
    p_ce = ce_logits.to(dtype).softmax(dim=-1)
    p_kd = (kd_logits.to(dtype) / beta).softmax(dim=-1)
    return (1.0 - alpha) * p_ce + alpha * p_kd


def fused_log_probs(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """``log p~`` of :func:`fused_probs`, ``p~`` clamped at the dtype's smallest normal number
    (a class both heads rule out has a finite logit)."""
    probs = fused_probs(ce_logits, kd_logits, alpha, beta)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _headless_student(
    name: str, in_chans: int, pretrained: bool, kwargs: dict[str, Any] | None
) -> nn.Module:
    """The timm backbone without a classifier: ``forward`` gives the pooled feature."""
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model {name!r}: see `timm.list_models('{name.split('.')[0][:4]}*')` "
            "for names that exist"
        )
    return timm.create_model(
        name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **(kwargs or {})
    )


def _metrics(num_classes: int, top_k: int) -> nn.ModuleDict:
    accuracy = lambda k: MulticlassAccuracy(num_classes, top_k=k, average="micro")  # noqa: E731
    metrics = {"top1": accuracy(1), "top1_ce": accuracy(1), "top1_kd": accuracy(1)}
    if top_k > 1:
        metrics[f"top{top_k}"] = accuracy(top_k)
    return nn.ModuleDict(metrics)


def _split_batch(batch: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``((x, y), x_u)`` from a ``{"labelled", "unlabelled"}`` dict or a plain ``(x, y)``."""
    if not isinstance(batch, Mapping):
        return (batch[0], batch[1]), None
    if LABELLED not in batch:
        raise ValueError(
            f"DualHeadDistillation training batches are (x, y) or {{'{LABELLED}': (x, y), "
            f"'{UNLABELLED}': (x_u, ...)}}; got a dict with keys {sorted(batch)}"
        )
    labelled, unlabelled = batch[LABELLED], batch.get(UNLABELLED)
    if unlabelled is not None and not torch.is_tensor(unlabelled):
        unlabelled = unlabelled[0]  # (images, ignored labels) from an ordinary dataset
    return (labelled[0], labelled[1]), unlabelled
