"""Cross-modal KD baseline: a unimodal student distilled from a frozen fusion or other-modality
teacher.

The reference KD baseline of "MST-Distill: Mixture of Specialized Teachers for Cross-Modal
Knowledge Distillation" (ACM MM 2025, arXiv:2507.07015), following its code
(github.com/Gray-OREO/MST-Distill, ``main-KD.py``: MM teacher -> student, ``main-KD-UU.py``:
cross-modal teacher -> student): the teacher is a checkpoint of ``main-T.py`` / ``main-S.py``
(here :class:`~kdzoo.methods.crossmodal.supervised.PairedSupervised`), and the student minimises
``(1 - a) CE + a T^2 KL(p_T || p_S)`` with ``a = 0.5``, ``T = 4`` (batch-mean KL, Hinton et al.
arXiv:1503.02531).

The teacher can be read from a teacher-output cache (``teacher.cache``, :mod:`kdzoo.cache`):
paired data is not augmented, so the teacher's logits for a sample are the same in every epoch,
and ``kdzoo cache build`` stores them once per (epoch, sample) like a classification teacher's
(:class:`~kdzoo.cache.adapters.PairedTeacher`). The run sets ``--data.init_args.augment_seed``
(the one the cache was built with), so that training batches carry the sample ids the cache is
read by; the network is then never built. Logits only: the KD loss reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdzoo.cache import CachedTeacher, CacheError
from kdzoo.cache.adapters import PairedTeacher
from kdzoo.errors import ConfigError
from kdzoo.losses.functional import kd_loss
from kdzoo.methods.crossmodal.base import (
    ROLES,
    PairedModule,
    describe_network,
    load_paired_checkpoint,
    modality_role,
)
from kdzoo.models.multimodal import FusionNet, UnimodalNet
from kdzoo.models.teacher import Teacher
from kdzoo.models.weights import load_strictly
from kdzoo.validation import check_fraction, check_positive

__all__ = ["CrossModalKD", "PairedTeacherSpec"]


@dataclass
class PairedTeacherSpec:
    """Where a cross-modal teacher comes from.

    Attributes:
        weights: the ``.ckpt`` of a
            :class:`~kdzoo.methods.crossmodal.supervised.PairedSupervised` run with
            ``network: fusion`` (KD from the multimodal teacher) or the other modality
            (cross-modal teacher). Required (``None`` is an error); there is no ``"random"``
            teacher here, since its architecture is read from the checkpoint.
        cache: a teacher-output cache made by ``kdzoo cache build`` from a CrossModalKD run with
            this teacher (:mod:`kdzoo.cache`): its stored logits are read for each training
            batch instead of running the teacher, which is never built (``weights`` is still
            required: the cache refuses any other file, by sha256). The run must use the data
            and ``augment_seed`` the cache was built with, and at most its epochs.
    """

    weights: str | None = None
    cache: str | None = None


class CrossModalKD(PairedModule):
    """KD into a student on ``target_modality`` from a frozen teacher that sees the other one.

    The teacher's architecture is read from its checkpoint, so it may differ from the student's;
    it is a :class:`~kdzoo.models.teacher.Teacher`: frozen, in eval mode for ever, run without
    autograd and left out of this run's checkpoints (rebuilt from ``teacher`` on load); or, with
    ``teacher.cache``, a :class:`~kdzoo.cache.CachedTeacher` giving the same logits.

    Args:
        teacher: where the teacher comes from (:class:`PairedTeacherSpec`: the ``.ckpt`` of a
            :class:`PairedSupervised` run); required. Formerly ``teacher_weights``.
        target_modality: the student's modality, 0 (m1) or 1 (m2).
        alpha: weight ``a`` of the KD term; the cross-entropy gets ``1 - a`` (repo: 0.5).
        temperature: ``T`` (repo: 4).
        **kwargs: the student's architecture (``encoders``, ``head_hidden``), ``num_classes``,
            ``modality_shapes``, optimiser and scheduler, see :class:`PairedModule`.
    """

    citation = (
        'Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". arXiv:1503.02531 '
        "(cross-modal baseline of MST-Distill, arXiv:2507.07015)"
    )
    description = "KD from another modality's teacher"
    renamed_arguments: ClassVar[Mapping[str, str]] = {"teacher_weights": "teacher"}
    #: What the method reads from the teacher (checked against a teacher cache).
    teacher_outputs: tuple[str, ...] = ("logits",)

    def __init__(
        self,
        teacher: PairedTeacherSpec | None = None,
        target_modality: int = 0,
        alpha: float = 0.5,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fraction(alpha=alpha)
        check_positive(temperature=temperature)
        self.student_role = modality_role(target_modality)
        self.student = self.build_network(self.student_role)
        spec = PairedTeacherSpec(**teacher) if isinstance(teacher, Mapping) else teacher
        spec = spec or PairedTeacherSpec()
        # Plain data in the checkpoint, so `torch.load(weights_only=True)` can read it back.
        self.hparams.teacher = asdict(spec)
        self.teacher: Teacher | CachedTeacher
        if spec.cache is not None:
            self.teacher_role, self.teacher = self._cached_teacher(spec)
        else:
            # Building the teacher never moves torch's RNG (forked): what is drawn after it (the
            # loader seed) is the same with a live teacher and a cached one (never built).
            with torch.random.fork_rng(devices=[]):
                self.teacher_role, self.teacher = self._build_teacher(spec.weights)
        self.loss_weights = {"ce": 1.0 - alpha, "kd": alpha}

    def result_names(self) -> dict[str, str]:
        return {**super().result_names(), "teacher": self.network_name(self.teacher_role)}

    @property
    def teacher_cached(self) -> bool:
        """Whether the teacher's logits come from a cache (``teacher.cache``)."""
        return isinstance(self.teacher, CachedTeacher)

    def _require_weights(self, path: str | None) -> str:
        if not path:  # the architecture comes from the checkpoint: no random teacher exists
            raise ConfigError(
                "CrossModalKD has no teacher: set --model.init_args.teacher.weights to the .ckpt "
                "of a PairedSupervised run (the fusion or the other modality's network)"
            )
        return path

    def _check_role(self, role: str, path: str) -> None:
        if role == self.student_role:
            raise ConfigError(
                f"the teacher in {path} was trained on {role}, the student's own modality: "
                "CrossModalKD distils from the fusion teacher or the other modality's network "
                f"(set target_modality, or train the teacher with network: fusion or the other)"
            )

    def _cached_teacher(self, spec: PairedTeacherSpec) -> tuple[str, CachedTeacher]:
        """The teacher's role and its logits from the cache ``spec.cache``, which must have been
        built from ``spec.weights`` (sha256) for these classes."""
        path = self._require_weights(spec.weights)
        cached = CachedTeacher(
            spec.cache,
            weights=path,
            name=None,  # the architecture is the checkpoint's, recorded by the cache
            num_classes=self.hparams.num_classes,
            needs=self.teacher_outputs,
            method=type(self).__name__,
            logits_only=True,
        )
        role = cached.manifest["teacher"].get("role")
        if role not in ROLES:
            raise CacheError(
                f"the teacher cache {spec.cache} holds a {cached.name} teacher, not a cross-modal "
                "one: build the cache from a CrossModalKD run config"
            )
        self._check_role(role, path)
        return role, cached

    def _build_teacher(self, path: str | None) -> tuple[str, Teacher]:
        """The role of the teacher in ``path`` and the frozen teacher, its weights loaded."""
        path = self._require_weights(path)
        recorded, state = load_paired_checkpoint(path, "teacher.weights")
        role = recorded.get("network")
        if role not in ROLES or "encoders" not in recorded:
            raise ConfigError(
                f"teacher.weights={path!r} is not a PairedSupervised checkpoint (no 'network' "
                "hyper-parameter): train the teacher with --model PairedSupervised"
            )
        self._check_role(role, path)
        shapes = [tuple(s) for s in recorded["modality_shapes"]]
        used = [0, 1] if role == "fusion" else [int(role[1]) - 1]
        wrong = [m for m in used if shapes[m] != self.modality_shapes[m]]
        if wrong or recorded["num_classes"] != self.hparams.num_classes:
            raise ConfigError(
                f"the {role} teacher in {path} was trained on inputs of shapes {shapes} with "
                f"{recorded['num_classes']} classes, but the data has {list(self.modality_shapes)} "
                f"and {self.hparams.num_classes}: use a teacher trained on this dataset"
            )
        hidden = recorded.get("head_hidden", (320, 160))
        if role == "fusion":
            fusion_hidden = recorded.get("fusion_head_hidden")
            if fusion_hidden is None:
                fusion_hidden = hidden
            network = FusionNet(
                recorded["encoders"], shapes, recorded["num_classes"], fusion_hidden
            )
        else:
            m = used[0]
            network = UnimodalNet(
                recorded["encoders"][m], shapes[m], recorded["num_classes"], hidden
            )
        prefix = "student."
        load_strictly(
            network,
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
            what=f"teacher weights {path}",
            into=f"the {role} network its hyper-parameters describe",
            hint="Was it saved by a PairedSupervised run?",
        )
        # No re-normalisation: the teacher takes the same (paired) inputs as the data gives.
        self._teacher_architecture = describe_network(role, recorded["encoders"])
        return role, Teacher(network)

    # ---- the teacher cache ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.teacher_cached and stage == "fit":
            self.teacher.check_run(self.trainer.datamodule, self.trainer.max_epochs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.teacher_cached:  # which samples, in which epoch, the cache must give
            self.teacher.select_batch(batch, self.current_epoch, items=4)

    def cache_adapter(self) -> PairedTeacher:
        """How ``kdzoo cache build`` runs and records this method's (live) teacher."""
        return PairedTeacher(
            self.teacher,
            role=self.teacher_role,
            architecture=self._teacher_architecture,
            weights=self.hparams.teacher["weights"],
            num_classes=self.hparams.num_classes,
            inputs=partial(self.inputs, self.teacher_role),
        )

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        x_m1, x_m2, target = self.split_batch(batch)
        student_logits = self.student(*self.inputs(self.student_role, x_m1, x_m2))
        teacher_logits = self.teacher(*self.inputs(self.teacher_role, x_m1, x_m2))  # no autograd
        t = self.hparams.temperature
        return {
            "ce": F.cross_entropy(student_logits.float(), target),
            "kd": kd_loss(student_logits, teacher_logits, temperature=t),
        }
