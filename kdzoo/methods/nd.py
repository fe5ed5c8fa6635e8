"""ND: a base KD loss plus the feature norm-and-direction term (KD++, DKD++, DIST++).

Wang, Cheng, Yao, Chen, Zhang, Li, Zhang. "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction". ECCV 2024, arXiv:2305.17007. Official code:
github.com/WangYZ1608/Knowledge-Distillation-via-ND (read at ``fc6f3f9``, kdzoo spec section 1).

The loss is ``ce_weight * CE + w(epoch) * kd_weight * BASE + w_nd(epoch) * nd_weight * ND`` with
BASE one of :func:`~kdzoo.losses.functional.kd_loss`, :func:`~kdzoo.losses.functional.dkd_loss`
or :func:`~kdzoo.losses.functional.dist_loss` and ND :func:`~kdzoo.losses.functional.nd_loss`.

Followed from the code (the paper's text was not readable):

* warm-up ``w(epoch) = min(1, epoch / warmup_epochs)`` with epochs counted from 0, so the base
  term is exactly 0 in the first epoch (20 epochs on CIFAR, 5 on ImageNet); the ND term is not
  warmed up (``warmup_nd=True`` gives the ImageNet DKD++ scripts' behaviour);
* the teacher class means: per-class arithmetic means of the teacher's penultimate embedding over
  the whole training split **with the training augmentation**, teacher in eval mode, computed once
  before training. The code's offline JSON rounds them to 4 decimals; kdzoo keeps the table
  unrounded (accumulated in float64, used in the loss's precision).
  The code's pitfall of always loading one teacher's table (spec 1.7) is avoided: the table is
  computed from, and cached under a hash of, the configured teacher's weights;
* the projector ``BatchNorm1d(d_s) -> Dropout(0.5) -> Linear(d_s, d_t)``, used for the ND term
  only (the logits come from the student's own classifier) and only when the widths differ;
  BatchNorm at weight 1 / bias 0, Linear at PyTorch's default with bias 0 (CIFAR code) or
  ``N(0, 0.01)`` weights and bias (``projector_init="normal"``, ImageNet code).

Per-pair loss factors of the code are in ``configs/cifar100/nd-{kd,dkd,dist}/`` and
``configs/imagenet/nd-{kd,dkd}/``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.cache import CacheError
from kdzoo.losses.functional import dist_loss, dkd_loss, kd_loss, nd_loss
from kdzoo.methods.base import DistillationModule
from kdzoo.methods.statistics import ClassMeans, class_means_on_training_data
from kdzoo.models.teacher import TeacherSpec
from kdzoo.validation import check_non_negative, check_positive

__all__ = ["ND", "nd_projector"]

Base = Literal["kd", "dkd", "dist"]


def nd_projector(student_dim: int, teacher_dim: int, init: str = "default") -> nn.Sequential:
    """The official code's ND projector: ``BatchNorm1d -> Dropout(0.5) -> Linear``."""
    norm, linear = nn.BatchNorm1d(student_dim), nn.Linear(student_dim, teacher_dim)
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    if init == "normal":  # ImageNet code
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.normal_(linear.bias, std=0.01)
    else:  # CIFAR code: PyTorch's default weight init, zero bias
        nn.init.zeros_(linear.bias)
    return nn.Sequential(norm, nn.Dropout(0.5), linear)


class ND(DistillationModule):
    """KD++ / DKD++ / DIST++: a base distillation loss plus the ND term.

    Loss terms: ``"ce"``, ``"kd"`` (the base term, whichever ``base`` is) and ``"nd"``; their
    weights are ``ce_weight``, ``kd_weight * w(epoch)`` and ``nd_weight`` (times ``w(epoch)``
    with ``warmup_nd``), updated at the start of every training epoch.

    The class-mean table is a non-persistent buffer filled in :meth:`on_fit_start` (from the cache
    under ``$KDZOO_HOME/class_stats`` when the same teacher weights and data settings were seen
    before). Outside ``fit`` (a bare :meth:`training_step` call) no table exists yet and the
    in-batch teacher class means stand in, with a warning.

    Args:
        teacher: the frozen teacher (architecture + weights).
        base: the base distillation loss: ``"kd"`` (KD++), ``"dkd"`` (DKD++), ``"dist"`` (DIST++).
        nd_weight: weight of the ND term (the code's ``nd_loss_factor``).
        kd_weight: weight of the base term (the code's ``kd_loss_factor``).
        ce_weight: weight of the cross-entropy with the labels.
        temperature: temperature of the base term (KD and DKD ``T``, DIST ``tau``).
        dkd_alpha: DKD's target-class weight (``base="dkd"``).
        dkd_beta: DKD's non-target-class weight (``base="dkd"``).
        dist_beta: DIST's inter-class weight (``base="dist"``).
        dist_gamma: DIST's intra-class weight (``base="dist"``).
        warmup_epochs: base-term warm-up length, ``min(1, epoch / warmup_epochs)`` from epoch 0;
            0 disables it.
        warmup_nd: warm the ND term up too (the code's ImageNet DKD++ scripts).
        projector: ``"auto"`` adds the projector when student and teacher widths differ;
            ``"always"`` adds it even when they match.
        projector_init: ``"default"`` (CIFAR code) or ``"normal"`` (ImageNet code).
        class_means_augment: compute the class means on augmented training images (the code);
            ``False`` uses the training split with the evaluation transforms.
        class_means_cache: read / write the class-mean cache.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Wang, Cheng, Yao, Chen, Zhang, Li, Zhang. "Improving Knowledge Distillation via '
        'Regularizing Feature Norm and Direction". ECCV 2024, arXiv:2305.17007'
    )
    description = "KD++ / DKD++ / DIST++: feature norm and direction"
    teacher_outputs = ("logits", "embedding_norm", "embedding_class_means")

    def __init__(
        self,
        teacher: TeacherSpec,
        base: Base = "kd",
        nd_weight: float = 2.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        temperature: float = 4.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        dist_beta: float = 1.0,
        dist_gamma: float = 1.0,
        warmup_epochs: int = 20,
        warmup_nd: bool = False,
        projector: Literal["auto", "always"] = "auto",
        projector_init: Literal["default", "normal"] = "default",
        class_means_augment: bool = True,
        class_means_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher=teacher, **kwargs)
        check_positive(temperature=temperature)
        check_non_negative(
            nd_weight=nd_weight,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            dkd_alpha=dkd_alpha,
            dkd_beta=dkd_beta,
            dist_beta=dist_beta,
            dist_gamma=dist_gamma,
            warmup_epochs=warmup_epochs,
        )
        self.base = base
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.warmup_nd = warmup_nd
        self.class_means_augment = class_means_augment
        self.class_means_cache = class_means_cache
        self._weights = {"ce": ce_weight, "kd": kd_weight, "nd": nd_weight}
        self.loss_weights = self.epoch_weights(0)

        student_dim = self.student.embedding_dim
        teacher_dim = self.teacher.embedding_dim
        self.projector: nn.Module = nn.Identity()
        if projector == "always" or student_dim != teacher_dim:
            self.projector = nd_projector(student_dim, teacher_dim, projector_init)
        # Filled in on_fit_start; not saved: it is recomputed (or read from the cache) per run.
        self.register_buffer("class_means", torch.empty(0), persistent=False)

    # ---- weights and the class-mean table ------------------------------------------------------
    def warmup_factor(self, epoch: int) -> float:
        """The code's ``min(1, epoch / warmup_epochs)``, epochs counted from 0."""
        if self.warmup_epochs == 0:
            return 1.0
        return min(1.0, epoch / self.warmup_epochs)

    def epoch_weights(self, epoch: int) -> dict[str, float]:
        """Loss-term weights in (0-based) ``epoch``."""
        factor = self.warmup_factor(epoch)
        return {
            "ce": self._weights["ce"],
            "kd": self._weights["kd"] * factor,
            "nd": self._weights["nd"] * (factor if self.warmup_nd else 1.0),
        }

    def on_train_epoch_start(self) -> None:
        self.loss_weights = self.epoch_weights(self.current_epoch)

    def on_fit_start(self) -> None:
        if self.teacher_cached:  # the cache's table: over epoch 0's augmented views, float64
            if not self.class_means_augment:
                raise CacheError(
                    "ND with class_means_augment=false needs class means over un-augmented "
                    "images, which a teacher cache does not hold: use the live teacher"
                )
            self.class_means = self.teacher.statistic("embedding_class_means").to(self.device)
            return
        self.class_means = class_means_on_training_data(
            self.trainer,
            lambda images: self.teacher_forward(images).embedding,
            self.hparams.num_classes,
            source=self.teacher,
            what="teacher-embedding",
            cache=self.class_means_cache,
            augment=self.class_means_augment,
        )

    # ---- the loss --------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        student = self.student(images)
        teacher = self.teacher_forward(images)
        return {
            "ce": F.cross_entropy(student.logits.float(), target),
            "kd": self.base_loss(student.logits, teacher.logits, target),
            "nd": nd_loss(
                self.projector(student.embedding),
                # A teacher cache stores only the norms, all the ND term reads.
                teacher.embedding if teacher.embedding is not None else teacher.embedding_norm,
                self._class_means_for(teacher.embedding, target),
                target,
            ),
        }

    def base_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """The unweighted base distillation term."""
        if self.base == "dkd":
            return dkd_loss(
                student_logits,
                teacher_logits,
                target,
                alpha=self.hparams.dkd_alpha,
                beta=self.hparams.dkd_beta,
                temperature=self.temperature,
            )
        if self.base == "dist":
            return dist_loss(
                student_logits,
                teacher_logits,
                beta=self.hparams.dist_beta,
                gamma=self.hparams.dist_gamma,
                temperature=self.temperature,
            )
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature)

    def _class_means_for(self, teacher_embedding: torch.Tensor, target: torch.Tensor):
        if self.class_means.numel():
            return self.class_means
        warnings.warn(
            "ND has no teacher class-mean table (it is computed when fit starts); using the "
            "in-batch teacher class means for this step",
            stacklevel=3,
        )
        return ClassMeans.of_batch(teacher_embedding, target, self.hparams.num_classes).means()
