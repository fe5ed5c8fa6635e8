"""Cross-modal KD baseline: a unimodal student distilled from a frozen fusion or other-modality
teacher.

The reference KD baseline of "MST-Distill: Mixture of Specialized Teachers for Cross-Modal
Knowledge Distillation" (ACM MM 2025, arXiv:2507.07015), following its code
(github.com/Gray-OREO/MST-Distill, ``main-KD.py``: MM teacher -> student, ``main-KD-UU.py``:
cross-modal teacher -> student): the teacher is a checkpoint of ``main-T.py`` / ``main-S.py``
(here :class:`~kdzoo.methods.crossmodal.supervised.PairedSupervised`), and the student minimises
``(1 - a) CE + a T^2 KL(p_T || p_S)`` with ``a = 0.5``, ``T = 4`` (batch-mean KL, Hinton et al.
arXiv:1503.02531).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import kd_loss
from kdzoo.methods.base import exclude_teacher_from_checkpoints
from kdzoo.methods.crossmodal.base import ROLES, PairedModule, load_paired_checkpoint, modality_role
from kdzoo.models.multimodal import FusionNet, UnimodalNet

__all__ = ["CrossModalKD"]


class CrossModalKD(PairedModule):
    """KD into a student on ``target_modality`` from a frozen teacher that sees the other one.

    The teacher's architecture is read from its checkpoint, so it may differ from the student's;
    it is frozen, in eval mode for ever, and left out of this run's checkpoints (rebuilt from
    ``teacher_weights`` on load).

    Args:
        teacher_weights: ``.ckpt`` of a :class:`PairedSupervised` run with ``network: fusion``
            (KD from the multimodal teacher) or the other modality (cross-modal teacher).
        target_modality: the student's modality, 0 (m1) or 1 (m2).
        alpha: weight ``a`` of the KD term; the cross-entropy gets ``1 - a`` (repo: 0.5).
        temperature: ``T`` (repo: 4).
        **kwargs: the student's architecture (``encoders``, ``head_hidden``), ``num_classes``,
            ``modality_shapes``, optimiser and scheduler, see :class:`PairedModule`.
    """

    def __init__(
        self,
        teacher_weights: str,
        target_modality: int = 0,
        alpha: float = 0.5,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.student_role = modality_role(target_modality)
        self.student = self.build_network(self.student_role)
        self.teacher_role, self.teacher = self._load_teacher(teacher_weights)
        self.freeze("teacher")
        exclude_teacher_from_checkpoints(self)
        self.loss_weights = {"ce": 1.0 - alpha, "kd": alpha}

    def _load_teacher(self, path: str | None) -> tuple[str, FusionNet | UnimodalNet]:
        if not path:  # the architecture comes from the checkpoint: no random teacher exists
            raise ConfigError(
                "CrossModalKD has no teacher: set --model.init_args.teacher_weights to the .ckpt "
                "of a PairedSupervised run (the fusion or the other modality's network)"
            )
        recorded, state = load_paired_checkpoint(path, "teacher_weights")
        role = recorded.get("network")
        if role not in ROLES or "encoders" not in recorded:
            raise ConfigError(
                f"teacher_weights={path!r} is not a PairedSupervised checkpoint (no 'network' "
                "hyper-parameter): train the teacher with --model PairedSupervised"
            )
        if role == self.student_role:
            raise ConfigError(
                f"the teacher in {path} was trained on {role}, the student's own modality: "
                "CrossModalKD distils from the fusion teacher or the other modality's network "
                f"(set target_modality, or train the teacher with network: fusion or the other)"
            )
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
            teacher = FusionNet(
                recorded["encoders"], shapes, recorded["num_classes"], fusion_hidden
            )
        else:
            m = used[0]
            teacher = UnimodalNet(
                recorded["encoders"][m], shapes[m], recorded["num_classes"], hidden
            )
        prefix = "student."
        teacher.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        return role, teacher

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        x_m1, x_m2, target = self.split_batch(batch)
        student_logits = self.student(*self.inputs(self.student_role, x_m1, x_m2))
        with torch.no_grad():
            teacher_logits = self.teacher(*self.inputs(self.teacher_role, x_m1, x_m2))
        t = self.hparams.temperature
        return {
            "ce": F.cross_entropy(student_logits.float(), target),
            "kd": kd_loss(student_logits, teacher_logits, temperature=t),
        }
