"""What a cache build needs to know about a method's teacher: how to run it, what to record.

A method whose teacher can be cached gives, through its ``cache_adapter()``, one of these
adapters; the build (:mod:`kdzoo.cache.build`) and ``kdzoo cache verify``
(:mod:`kdzoo.cache.report`) only talk to the adapter, so they hold no branch per method family.
An adapter says

- :meth:`~TeacherAdapter.record`: the manifest's ``teacher`` section (what a run must match:
  ``architecture``, ``weights_sha256``, ``num_classes``, plus what ``kdzoo cache info`` shows);
- :meth:`~TeacherAdapter.run`: the teacher's outputs on the batched inputs of training views.
  A view is what the training dataset's ``view(i, epoch)`` gives: ``(*inputs, target,
  sample id)``, one image for classification data, ``(x_m1, x_m2)`` for paired modalities;
- :attr:`~TeacherAdapter.outputs`: which cache outputs it can give (:data:`OUTPUTS`).

:class:`ClassifierTeacher` is the timm classifier of the classification methods (logits and
embedding: every output); :class:`PairedTeacher` the frozen fusion or other-modality network of
:class:`~kdzoo.methods.crossmodal.kd.CrossModalKD` (logits only: the cross-modal networks have
no pooled embedding that a method reads).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdzoo.cache.manifest import weights_sha256
from kdzoo.cache.store import CacheError

__all__ = ["OUTPUTS", "ClassifierTeacher", "PairedTeacher", "TeacherAdapter"]

#: What a cache can hold. The class-mean tables are over epoch 0's views, float64.
OUTPUTS = ("logits", "embedding_norm", "embedding_class_means", "softmax_class_means")


class TeacherAdapter(ABC):
    """A method's live teacher as a cache build sees it (see the module docstring).

    Args:
        teacher: the frozen teacher network (a :class:`~kdzoo.models.teacher.Teacher`).
    """

    #: The cache outputs this teacher can give.
    outputs: tuple[str, ...] = ("logits",)

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Width of the teacher's logits."""

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """The manifest's ``teacher`` section (hashes the weight file)."""

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"logits": (N, C)}`` (and ``"embedding"`` where the teacher has one) for the
        batched ``inputs`` of N training views."""

    def to(self, device: torch.device | str) -> TeacherAdapter:
        self.teacher.to(device).eval()
        return self


def _size(network: nn.Module) -> dict[str, int]:
    parameters = list(network.parameters())
    return {
        "parameters": sum(p.numel() for p in parameters),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters),
    }


class ClassifierTeacher(TeacherAdapter):
    """The timm classifier teacher of a :class:`~kdzoo.methods.base.DistillationModule`.

    Args:
        teacher: the module's :class:`~kdzoo.models.teacher.Teacher` over a
            :class:`~kdzoo.models.backbone.Backbone`.
        spec: the module's ``teacher`` hyper-parameters (a
            :class:`~kdzoo.models.teacher.TeacherSpec` as a mapping).
        method: the method's name, for the messages.
    """

    outputs = OUTPUTS

    def __init__(self, teacher: nn.Module, spec: Mapping[str, Any], method: str) -> None:
        backbone = getattr(teacher, "backbone", None)
        if backbone is None or not hasattr(backbone, "embedding_dim"):
            raise CacheError(
                f"{method} has no timm classifier teacher to cache (a kdzoo distillation method "
                "with --model.init_args.teacher is needed)"
            )
        super().__init__(teacher)
        self.backbone, self.weights = backbone, spec.get("weights")

    @property
    def num_classes(self) -> int:
        return int(self.backbone.num_classes)

    def record(self) -> dict[str, Any]:
        return {
            "architecture": self.backbone.name,
            "weights": self.weights,
            "weights_sha256": weights_sha256(self.weights),
            "num_classes": self.num_classes,
            "embedding_dim": int(self.backbone.embedding_dim),
            **_size(self.backbone),
        }

    def run(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        output = self.teacher(*inputs)
        return {"logits": output.logits, "embedding": output.embedding}


class PairedTeacher(TeacherAdapter):
    """The frozen fusion or unimodal teacher of a cross-modal method, run on paired views.

    Args:
        teacher: the frozen network (logits out).
        role: ``"fusion"``, ``"m1"`` or ``"m2"``: what the teacher sees, recorded in the manifest
            (a run reading the cache learns it from there, without loading the checkpoint).
        architecture: a description of the network, e.g. ``fusion(test_resnet+test_resnet)``.
        weights: the teacher's checkpoint.
        num_classes: width of its logits.
        inputs: the teacher's inputs taken from ``(x_m1, x_m2)``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        role: str,
        architecture: str,
        weights: str,
        num_classes: int,
        inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> None:
        super().__init__(teacher)
        self.role, self.architecture, self.weights = role, architecture, weights
        self._num_classes, self.inputs = int(num_classes), inputs

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def record(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "role": self.role,
            "weights": self.weights,
            "weights_sha256": weights_sha256(self.weights),
            "num_classes": self.num_classes,
            **_size(self.teacher),
        }

    def run(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x_m1, x_m2 = inputs
        return {"logits": self.teacher(*self.inputs(x_m1, x_m2))}
