"""MST-Distill: cross-modal KD from a mixture of specialised teachers, routed per instance.

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015; code github.com/Gray-OREO/MST-Distill (``main-MST-Distill.py``), which
this follows (the paper's text could not be checked; spec ``crossmodal_active.md`` Part 1). A
student that sees one modality learns from a fusion teacher ``T`` (both modalities) and a
cross-modal teacher ``A`` (the other modality), in three stages, one Lightning run each, chained
through checkpoints (``init_from``):

1. **Co-training** of ``T``, ``A`` and the student ``S`` from scratch, one optimiser, on
   ``L_T + L_A + L_S`` with ``L_n = CE + sum_{o != n} T^2 KL(p_o || p_n)`` (nothing detached).
2. **MaskNets**: each teacher gets one MaskNet per hooked layer (``mm_layers``, ``cm_layers``;
   default ``fc1, fc2`` each, so ``E = 4`` experts); ``T``, ``A``, ``S`` frozen in eval mode; each
   MaskNet, with its own Adam (manual optimisation), pulls its masked teacher towards the student,
   ``T^2 KL(p_S || p_mask)``. Model selection: lowest ``val/mask_loss`` (mean over MaskNets).
3. **Routed distillation**: ``T``, ``A`` and the MaskNets frozen; the student (from stage 1) and a
   GateNet on its logits train on ``task_weight CE + kl_weight L_route + lb_weight L_lb`` (top-k
   routed KD, load balancing); after each epoch ``e``, ``lb_weight *= 0.9`` if ``e % 10 == 0``
   and ``kl_weight *= 0.5`` if ``e % 30 == 0``. Model selection: lowest ``val/ce`` of the student.

The deployed student is ``student.*`` of any stage's checkpoint (a
:class:`~kdzoo.models.multimodal.UnimodalNet`); ``val/top1`` is always the student's, stage 1
also logs the teachers' ``val/top1_mm`` and ``val/top1_cm``.

``routing: code`` (default) is the repo's router: the gate gets gradient only from the
load-balancing loss (top-k selection, unweighted KD). ``routing: gate_weighted`` multiplies the
KD terms by the renormalised top-k gate values, so the router also learns from the KD loss (a
variant; it needs ``top_k >= 2``, since a single renormalised weight is constantly 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import (
    mst_cotraining_losses,
    mst_load_balancing_loss,
    mst_mask_loss,
    mst_routed_kd_loss,
)
from kdzoo.methods.crossmodal.base import PairedModule, load_paired_checkpoint, modality_role
from kdzoo.methods.crossmodal.gate import GateNet
from kdzoo.methods.crossmodal.masknet import (
    build_masknet,
    find_layer,
    layer_output_shape,
    masked_layer,
)
from kdzoo.validation import check_at_least, check_positive

__all__ = ["MSTDistill"]

# What each stage loads from the checkpoint it starts from.
_LOADED = {
    2: ("mm_teacher", "cm_teacher", "student"),
    3: ("mm_teacher", "cm_teacher", "student", "masknets"),
}
_EXPERT_KEYS = ("mm_layers", "cm_layers", "mask_heads", "mask_hidden_factor")


class MSTDistill(PairedModule):
    """One stage of MST-Distill (see the module docstring).

    Args:
        stage: 1 (co-training), 2 (MaskNets) or 3 (routed distillation).
        target_modality: the student's modality, 0 (m1) or 1 (m2).
        init_from: the checkpoint of the previous stage (required for stages 2 and 3; read with
            ``torch.load(weights_only=True)``); its architecture must be this run's.
        mm_layers: layers of the fusion teacher that get a MaskNet (one expert each), e.g.
            ``[fc1, fc2]`` or ``[concat_identity, fc1]``; see
            :func:`~kdzoo.models.multimodal.hook_point_names`.
        cm_layers: layers of the cross-modal teacher that get a MaskNet.
        mask_heads: attention heads of a MaskNet (repo: 3).
        mask_hidden_factor: MaskNet token width ``~ C / factor`` (repo: 2).
        top_k: experts each sample is distilled from, ``1 <= k <= E`` (repo: 1).
        lb_mode: load balancing ``"KL"`` (repo default) or ``"CV"``.
        routing: ``"code"`` (repo) or ``"gate_weighted"`` (see the module docstring).
        task_weight: weight of the student's cross-entropy in stage 3.
        kl_weight: initial weight of the routed KD in stage 3.
        lb_weight: initial weight of the load-balancing loss in stage 3.
        lb_decay: ``lb_weight`` is multiplied by this after every epoch ``e`` with
            ``e % lb_decay_every == 0`` (repo: 0.9 every 10; 1 disables it).
        lb_decay_every: see ``lb_decay``.
        kl_decay: as ``lb_decay``, for ``kl_weight`` (repo: 0.5 every 30).
        kl_decay_every: see ``kl_decay``.
        temperature: ``T`` of every KL (repo: 4).
        **kwargs: architecture (``encoders``, ``head_hidden``, ``fusion_head_hidden``),
            ``num_classes``, ``modality_shapes``, optimiser (Adam, lr 1e-4) and scheduler (stages
            1 and 3), see :class:`~kdzoo.methods.crossmodal.base.PairedModule`.
    """

    citation = (
        '"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation". '
        "ACM MM 2025, arXiv:2507.07015"
    )
    description = "mixture of specialised cross-modal teachers"
    renamed_arguments: ClassVar[Mapping[str, str]] = {
        "w_task": "task_weight",
        "w_kl": "kl_weight",
        "w_lb": "lb_weight",
    }

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 1,
        target_modality: int = 0,
        init_from: str | None = None,
        mm_layers: Sequence[str] = ("fc1", "fc2"),
        cm_layers: Sequence[str] = ("fc1", "fc2"),
        mask_heads: int = 3,
        mask_hidden_factor: int = 2,
        top_k: int = 1,
        lb_mode: Literal["KL", "CV"] = "KL",
        routing: Literal["code", "gate_weighted"] = "code",
        task_weight: float = 1.0,
        kl_weight: float = 1.0,
        lb_weight: float = 1.0,
        lb_decay: float = 0.9,
        lb_decay_every: int = 10,
        kl_decay: float = 0.5,
        kl_decay_every: int = 30,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_arguments(self.hparams)
        if stage == 2 and self.scheduler is not None:
            raise ConfigError("stage 2 trains one optimiser per MaskNet and takes no scheduler")
        self.stage = stage
        self.optimizer_per_group = stage == 2
        # Model selection of the official code: none in stage 1 (the last state), the lowest
        # mean mask loss in stage 2, the student's lowest validation CE in stage 3.
        self.checkpoint_metric = {1: None, 2: "val/mask_loss", 3: "val/ce"}[stage]
        self.checkpoint_mode = "min"
        self.student_role = modality_role(target_modality)
        self.other_role = modality_role(1 - target_modality)
        self.mm_teacher = self.build_network("fusion")
        self.cm_teacher = self.build_network(self.other_role)
        self.student = self.build_network(self.student_role)
        self.experts = [("mm_teacher", name) for name in mm_layers]
        self.experts += [("cm_teacher", name) for name in cm_layers]
        for network, layer in self.experts:  # a typo fails in stage 1 already
            find_layer(getattr(self, network), layer)
        if stage >= 2:
            self.masknets = nn.ModuleList(self._build_masknet(*expert) for expert in self.experts)
        if stage == 3:
            self.gate = GateNet(self.hparams.num_classes, len(self.experts))
        if init_from is not None:
            self._load_previous_stage(init_from)
        if stage == 1:
            self.loss_weights = {"mm": 1.0, "cm": 1.0, "student": 1.0}
            # The teachers' accuracies: val/top1_mm, val/top1_cm, test/top1_mm, ...
            self.val_mm = self.accuracy_metrics(self.hparams.num_classes, "val/", "_mm")
            self.val_cm = self.accuracy_metrics(self.hparams.num_classes, "val/", "_cm")
            self.test_mm = self.accuracy_metrics(self.hparams.num_classes, "test/", "_mm")
            self.test_cm = self.accuracy_metrics(self.hparams.num_classes, "test/", "_cm")
        elif stage == 2:
            self.freeze("mm_teacher", "cm_teacher", "student")
            self.automatic_optimization = False
        else:
            self.freeze("mm_teacher", "cm_teacher", "masknets")
            self.loss_weights = self.stage3_weights(0)

    # ---- experts ------------------------------------------------------------------------------
    def _role(self, network: str) -> str:
        return "fusion" if network == "mm_teacher" else self.other_role

    def _build_masknet(self, network: str, layer: str) -> nn.Module:
        role = self._role(network)
        example = [torch.zeros(2, *shape) for shape in self.modality_shapes]
        shape = layer_output_shape(getattr(self, network), layer, self.inputs(role, *example))
        return build_masknet(shape, self.hparams.mask_heads, self.hparams.mask_hidden_factor)

    def expert_logits(self, j: int, x_m1: torch.Tensor, x_m2: torch.Tensor) -> torch.Tensor:
        """Logits of specialised teacher ``j``: its base teacher with MaskNet ``j`` hooked in."""
        network, layer = self.experts[j]
        net = getattr(self, network)
        with masked_layer(net, layer, self.masknets[j]):
            return net(*self.inputs(self._role(network), x_m1, x_m2))

    def _load_previous_stage(self, path: str) -> None:
        recorded, state = load_paired_checkpoint(path, "init_from")
        if "stage" not in recorded or "mm_layers" not in recorded:
            raise ConfigError(f"init_from={path!r} is not an MSTDistill checkpoint")
        if recorded["stage"] != self.stage - 1:
            raise ConfigError(
                f"stage {self.stage} starts from the checkpoint of stage {self.stage - 1}, but "
                f"init_from={path!r} is a stage-{recorded['stage']} checkpoint"
            )
        keys = ("target_modality", *(_EXPERT_KEYS if self.stage == 3 else ()))
        mismatch = self.architecture_mismatch(recorded, extra_keys=keys)
        if mismatch:
            raise ConfigError(
                f"init_from={path!r} was trained with other settings than this run: "
                + "; ".join(mismatch)
                + " (checkpoint vs this run): use the same architecture in every stage"
            )
        for part in _LOADED[self.stage]:
            prefix = part + "."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            getattr(self, part).load_state_dict(sub)

    # ---- stage 3 weights ----------------------------------------------------------------------
    def stage3_weights(self, epoch: int) -> dict[str, float]:
        """Loss weights during ``epoch`` (0-based): the decays fired after epochs ``0..epoch-1``
        (``ceil(epoch / every)`` times), computed from the epoch so a resumed run agrees."""
        hp = self.hparams
        return {
            "ce": hp.task_weight,
            "route": hp.kl_weight * hp.kl_decay ** math.ceil(epoch / hp.kl_decay_every),
            "lb": hp.lb_weight * hp.lb_decay ** math.ceil(epoch / hp.lb_decay_every),
        }

    def on_train_epoch_start(self) -> None:
        if self.stage == 3:
            self.loss_weights = self.stage3_weights(self.current_epoch)

    # ---- training -----------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        x_m1, x_m2, target = self.split_batch(batch)
        x_s = self.inputs(self.student_role, x_m1, x_m2)
        temperature = self.hparams.temperature
        if self.stage == 1:
            logits = [
                self.mm_teacher(x_m1, x_m2),
                self.cm_teacher(*self.inputs(self.other_role, x_m1, x_m2)),
                self.student(*x_s),
            ]
            losses = mst_cotraining_losses(logits, target, temperature=temperature)
            return dict(zip(("mm", "cm", "student"), losses, strict=True))
        if self.stage == 2:
            raise RuntimeError("stage 2 trains its MaskNets in training_step, one at a time")
        with torch.no_grad():
            experts = [self.expert_logits(j, x_m1, x_m2) for j in range(len(self.experts))]
        student = self.student(*x_s)
        gate_probs = self.gate(student).float().softmax(dim=1)
        self._log_routing(gate_probs, len(target))
        route = mst_routed_kd_loss(
            student,
            torch.stack(experts, dim=1),
            gate_probs,
            top_k=self.hparams.top_k,
            temperature=temperature,
            gate_weighted=self.hparams.routing == "gate_weighted",
        )
        return {
            "ce": F.cross_entropy(student.float(), target),
            "route": route,
            "lb": mst_load_balancing_loss(gate_probs, mode=self.hparams.lb_mode),
        }

    def _log_routing(self, gate_probs: torch.Tensor, batch_size: int) -> None:
        if self._trainer is None:  # loss_terms called outside a Trainer (tests, notebooks)
            return
        chosen = gate_probs.topk(self.hparams.top_k, dim=1).indices.flatten()
        share = torch.bincount(chosen, minlength=len(self.experts)).float() / len(chosen)
        for j, value in enumerate(share):
            self.log(f"train/route_share_{j}", value, batch_size=batch_size)

    def mask_loss(
        self, j: int, x_m1: torch.Tensor, x_m2: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor:
        """Stage-2 loss of MaskNet ``j``: ``T^2 KL(p_S || p_mask_j)``, the student detached."""
        masked = self.expert_logits(j, x_m1, x_m2)
        return mst_mask_loss(masked, student_logits, temperature=self.hparams.temperature)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.stage != 2:
            return super().training_step(batch, batch_idx)
        x_m1, x_m2, _ = self.split_batch(batch)
        with torch.no_grad():
            student = self.student(*self.inputs(self.student_role, x_m1, x_m2))
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        losses = []
        for j, optimizer in enumerate(optimizers):  # one MaskNet at a time, as the repo
            loss = self.mask_loss(j, x_m1, x_m2, student)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            losses.append(loss.detach())
            self.log(f"train/loss_mask{j}", losses[-1], batch_size=len(x_m1))
        mean = torch.stack(losses).mean()
        self.log("train/loss", mean, prog_bar=True, batch_size=len(x_m1))
        return mean

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, batch: Any, metrics: Any, stage: str) -> torch.Tensor:
        loss = super().evaluate(batch, metrics, stage)
        self.log(f"{stage}/ce", loss, sync_dist=True, batch_size=len(batch[-1]))
        x_m1, x_m2, target = self.split_batch(batch)
        if self.stage == 1:
            for network, role in (("mm", "fusion"), ("cm", self.other_role)):
                teacher_metrics = getattr(self, f"{stage}_{network}")
                logits = getattr(self, f"{network}_teacher")(*self.inputs(role, x_m1, x_m2))
                teacher_metrics.update(logits, target)
                self.log_dict(teacher_metrics)
        elif self.stage == 2:
            student = self(*self.inputs(self.student_role, x_m1, x_m2))
            losses = [self.mask_loss(j, x_m1, x_m2, student) for j in range(len(self.experts))]
            for j, value in enumerate(losses):
                self.log(f"{stage}/mask_loss{j}", value, sync_dist=True, batch_size=len(target))
            mean = torch.stack(losses).mean()
            self.log(f"{stage}/mask_loss", mean, sync_dist=True, batch_size=len(target))
        return loss

    # ---- optimisation -------------------------------------------------------------------------
    def parameter_groups(self) -> list[Any]:
        if self.stage == 2:  # one optimiser per MaskNet (the repo's optimizers_MN*_s2)
            return [{"params": masknet.parameters()} for masknet in self.masknets]
        return super().parameter_groups()


def _check_arguments(hp: Any) -> None:
    if hp.stage == 1 and hp.init_from is not None:
        raise ConfigError("stage 1 trains all three networks from scratch: remove init_from")
    if hp.stage > 1 and hp.init_from is None:
        raise ConfigError(
            f"stage {hp.stage} starts from the checkpoint of stage {hp.stage - 1}: set init_from "
            "to that run's .ckpt"
        )
    num_experts = len(hp.mm_layers) + len(hp.cm_layers)
    if num_experts == 0:
        raise ConfigError("MST-Distill needs at least one expert: set mm_layers and/or cm_layers")
    if not 1 <= hp.top_k <= num_experts:
        raise ConfigError(
            f"top_k={hp.top_k} must be between 1 and the number of experts, {num_experts} "
            f"(len(mm_layers) + len(cm_layers)): lower top_k or hook more layers"
        )
    if hp.routing == "gate_weighted" and hp.top_k < 2:
        raise ConfigError(
            "routing='gate_weighted' needs top_k >= 2: with one selected expert its renormalised "
            "gate weight is always 1, so the router would get no gradient from the KD loss"
        )
    check_positive(temperature=hp.temperature)
    check_at_least(1, lb_decay_every=hp.lb_decay_every, kl_decay_every=hp.kl_decay_every)
