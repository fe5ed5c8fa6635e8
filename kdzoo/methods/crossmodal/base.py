"""The contract of kdzoo's cross-modal methods: paired-modality batches, one deployed network.

A paired-modality datamodule yields batches ``(x_m1, x_m2, y)`` (training batches
``(x_m1, x_m2, y, ids)`` with ``augment_seed``: the sample ids, which only a method reading a
teacher-output cache uses; :meth:`PairedModule.split_batch` drops them for every other) and
exposes ``num_classes`` and ``modality_shapes`` (per-sample shapes, linked into every module here
by the CLI). The network architectures are described once, by ``encoders`` (one spec per
modality, see :mod:`kdzoo.models.multimodal`), ``head_hidden`` (the unimodal nets' head) and
``fusion_head_hidden`` (the fusion net's head), so the same YAML block builds the fusion teacher,
the cross-modal teacher and the student of "MST-Distill: Mixture of Specialized Teachers for
Cross-Modal Knowledge Distillation" (ACM MM 2025, arXiv:2507.07015; code
github.com/Gray-OREO/MST-Distill) and of its baselines.

:class:`PairedModule` (over the root :class:`~kdzoo.methods.module.KDZooModule`, which owns
the optimiser and the weighted loss terms) adds the evaluated network ``self.student`` (a
``"fusion"`` net or a unimodal net on ``"m1"``/``"m2"``) and accuracy metrics (``val/top1``,
``val/top5``, ``val/loss`` = the student's cross-entropy).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from kdzoo.errors import ConfigError
from kdzoo.methods.module import Deployable, KDZooModule
from kdzoo.models.multimodal import FusionNet, UnimodalNet
from kdzoo.models.weights import safe_torch_load

__all__ = [
    "ROLES",
    "PairedModule",
    "describe_network",
    "load_paired_checkpoint",
    "modality_role",
]

#: The networks of the cross-modal setting: the fusion net and a unimodal net per modality.
ROLES = ("fusion", "m1", "m2")
#: Hyper-parameters that fix a network's architecture (compared when weights are loaded).
ARCHITECTURE_KEYS = ("encoders", "head_hidden", "fusion_head_hidden", "modality_shapes")


def modality_role(modality: int) -> str:
    """``"m1"`` for modality 0, ``"m2"`` for modality 1."""
    if modality not in (0, 1):
        raise ConfigError(f"target_modality must be 0 (m1) or 1 (m2), got {modality!r}")
    return f"m{modality + 1}"


def recorded_role(hparams: Mapping[str, Any]) -> str:
    """The role of a run's evaluated network from its hyper-parameters: ``network``
    (``PairedSupervised``) or the student's ``target_modality``."""
    return hparams.get("network") or modality_role(int(hparams.get("target_modality", 0)))


def describe_network(role: str, encoders: Sequence[Mapping[str, Any]]) -> str:
    """``fusion(a+b)`` for the fusion net over encoders ``a`` and ``b``, ``name (m1)`` for a
    unimodal one."""
    names = [e.get("name") or e.get("kind", "") for e in encoders]
    if role == "fusion":
        return f"fusion({'+'.join(names)})"
    return f"{names[int(role[1]) - 1]} ({role})"


def load_paired_checkpoint(path: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Hyper-parameters and state dict of a kdzoo Lightning checkpoint (``weights_only`` load)."""
    checkpoint = safe_torch_load(path)
    if not (
        isinstance(checkpoint, Mapping) and {"state_dict", "hyper_parameters"} <= set(checkpoint)
    ):
        raise ConfigError(
            f"{what}={path!r} is not a Lightning checkpoint of a kdzoo cross-modal run (it has no "
            "state_dict and hyper_parameters): pass the .ckpt that run wrote"
        )
    return dict(checkpoint["hyper_parameters"]), dict(checkpoint["state_dict"])


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so hyper-parameters compare equal after a YAML round trip."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class PairedModule(KDZooModule):
    """A network trained on paired-modality batches from named, weighted loss terms.

    Subclasses set :attr:`student_role`, build :attr:`student` (with :meth:`build_network`),
    implement :meth:`loss_terms` and set :attr:`loss_weights`.

    Args:
        encoders: one encoder spec per modality, e.g.
            ``[{"kind": "mlp", "hidden": [1024, 512]}, {"kind": "mlp", "hidden": [1024, 512]}]``.
        num_classes: classifier outputs (linked from ``data.num_classes``).
        modality_shapes: per-sample input shape per modality (linked from
            ``data.modality_shapes``), e.g. ``[[1, 28, 28], [1, 112, 112]]``.
        head_hidden: widths of the unimodal nets' ``fc1, fc2, ...`` (repo's RAVDESS: 320, 160).
        fusion_head_hidden: widths of the fusion net's ``fc1, fc2, ...`` (``None``: as
            ``head_hidden``).
        optimizer: optimiser factory (default Adam, lr 1e-4, as every script of the repo).
        scheduler: optional learning-rate scheduler factory (stepped every epoch).
    """

    #: Which network is evaluated and deployed: ``"fusion"``, ``"m1"`` or ``"m2"``.
    student_role: str = "m1"

    def __init__(
        self,
        encoders: Sequence[Mapping[str, Any]],
        num_classes: int,
        modality_shapes: Sequence[Sequence[int]],
        head_hidden: Sequence[int] = (320, 160),
        fusion_head_hidden: Sequence[int] | None = None,
        optimizer: OptimizerCallable = lambda params: torch.optim.Adam(params, lr=1e-4),
        scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if len(modality_shapes) != 2 or len(encoders) != 2:
            raise ConfigError(
                f"cross-modal methods need two modalities: got {len(modality_shapes)} modality "
                f"shapes and {len(encoders)} encoder specs (one per modality)"
            )
        self.modality_shapes = tuple(tuple(int(s) for s in shape) for shape in modality_shapes)
        self._frozen: list[str] = []
        self.val_metrics = self.accuracy_metrics(num_classes, "val/")
        self.test_metrics = self.accuracy_metrics(num_classes, "test/")

    # ---- networks -----------------------------------------------------------------------------
    def build_network(self, role: str) -> nn.Module:
        """A fresh ``"fusion"`` net or unimodal net on ``"m1"``/``"m2"`` of this architecture."""
        hp = self.hparams
        if role == "fusion":
            hidden = hp.fusion_head_hidden if hp.fusion_head_hidden is not None else hp.head_hidden
            return FusionNet(hp.encoders, self.modality_shapes, hp.num_classes, hidden)
        if role not in ROLES:
            raise ConfigError(f"network must be one of {ROLES}, got {role!r}")
        m = int(role[1]) - 1
        return UnimodalNet(hp.encoders[m], self.modality_shapes[m], hp.num_classes, hp.head_hidden)

    @staticmethod
    def inputs(role: str, x_m1: torch.Tensor, x_m2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inputs the ``role`` network takes from a paired batch."""
        return {"fusion": (x_m1, x_m2), "m1": (x_m1,), "m2": (x_m2,)}[role]

    def freeze(self, *names: str) -> None:
        """Stop the gradients of these sub-networks and keep them in eval mode for ever.

        For networks that are *not* teachers: MST-Distill's stages back-propagate through
        their frozen networks (to the MaskNets) and read them back from the previous stage's
        checkpoint, so they stay differentiable and checkpointed. A frozen teacher is a
        :class:`~kdzoo.models.teacher.Teacher` (no autograd, never checkpointed) instead.
        """
        for name in names:
            getattr(self, name).requires_grad_(False).eval()
            self._frozen.append(name)

    def train(self, mode: bool = True) -> PairedModule:
        # Lightning calls train() at every epoch start; frozen networks must keep their
        # BatchNorm statistics and dropout as trained.
        super().train(mode)
        for name in self._frozen:
            getattr(self, name).train(False)
        return self

    # ---- data ---------------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_m1, x_m2, y)`` of a paired-modality batch (the sample ids of a training batch
        with ``augment_seed``, a fourth item, left out), or a clear error for any other."""
        if not (
            isinstance(batch, Sequence)
            and len(batch) in (3, 4)
            and all(map(torch.is_tensor, batch))
        ):
            got = f"{len(batch)} items" if isinstance(batch, Sequence) else type(batch).__name__
            raise ConfigError(
                f"{type(self).__name__} needs batches (x_m1, x_m2, y), one tensor per modality and "
                f"the labels, but got {got}: the data must be a paired-modality datamodule"
            )
        return batch[0], batch[1], batch[2]

    # ---- training ------------------------------------------------------------------------------
    @abstractmethod
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms for one training batch, keyed by name."""

    def batch_size(self, batch: Any) -> int:
        return len(batch[-1])

    # ---- evaluation -----------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the deployed network (one modality for a student, both for fusion)."""
        return self.student(*inputs)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x_m1, x_m2, _ = self.split_batch(batch)
        probs = self(*self.inputs(self.student_role, x_m1, x_m2)).float().softmax(dim=-1)
        return {"probs": probs, "prediction": probs.argmax(dim=-1)}

    def evaluate(self, batch: Any, metrics: MetricCollection, stage: str) -> torch.Tensor:
        """Logs ``<stage>/loss`` (cross-entropy) and the accuracies of the deployed network;
        returns the loss."""
        x_m1, x_m2, target = self.split_batch(batch)
        logits = self(*self.inputs(self.student_role, x_m1, x_m2))
        loss = F.cross_entropy(logits.float(), target)
        metrics.update(logits, target)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(target))
        self.log_dict(metrics, prog_bar=True)
        return loss

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        """The evaluated network of the run (``network`` or ``target_modality`` recorded)."""
        role = recorded_role(hparams)
        shapes = tuple(tuple(int(s) for s in shape) for shape in hparams["modality_shapes"])
        # Never timm's pretrained weights: the checkpoint's replace them (and a hub load must
        # not download anything).
        encoders = [
            {**spec, "pretrained": False} if "pretrained" in spec else spec
            for spec in hparams["encoders"]
        ]
        if role == "fusion":
            hidden = hparams.get("fusion_head_hidden") or hparams.get("head_hidden", (320, 160))
            network = FusionNet(encoders, shapes, hparams["num_classes"], hidden)
            inputs, backbone = shapes, "fusion"
        else:
            m = int(role[1]) - 1
            hidden = hparams.get("head_hidden", (320, 160))
            network = UnimodalNet(encoders[m], shapes[m], hparams["num_classes"], hidden)
            inputs, backbone = (shapes[m],), str(encoders[m].get("name") or encoders[m]["kind"])
        reason = (
            f"a kdzoo {type(network).__name__} over paired-modality inputs ({role}: "
            f"{', '.join(map(str, map(list, inputs)))} per sample) returning class logits"
        )
        return Deployable(
            network,
            prefix="student.",
            reason=reason,
            backbone=backbone.split(".")[0],
            inputs=inputs,
        )

    def result_names(self) -> dict[str, str]:
        """The encoder of the modality the student sees (``name (m1)``) or ``fusion(a+b)``."""
        return {"student": self.network_name(recorded_role(self.hparams)), "teacher": ""}

    def network_name(self, role: str) -> str:
        """``fusion(a+b)`` for the fusion net, ``name (m1)`` for a unimodal one."""
        return describe_network(role, self.hparams.encoders)

    # ---- loading weights ----------------------------------------------------------------------
    def architecture_mismatch(
        self, recorded: Mapping[str, Any], extra_keys: Sequence[str] = ()
    ) -> list[str]:
        """``key: recorded vs ours`` for each architecture hyper-parameter (and each of
        ``extra_keys``) that differs between a checkpoint's ``recorded`` ones and this run's."""
        return [
            f"{key}: {recorded[key]!r} vs {self.hparams[key]!r}"
            for key in (*ARCHITECTURE_KEYS, "num_classes", *extra_keys)
            if key in recorded and _plain(recorded[key]) != _plain(self.hparams[key])
        ]
