"""Teachers: a frozen :class:`~kdzoo.models.backbone.Backbone` built from a name and weights.

:class:`TeacherSpec` is the config block every distillation method (and every test-time
adaptation source model) reads; :func:`build_teacher` turns it into a :class:`Teacher`: frozen,
in eval mode for ever, run without autograd, and re-normalising the student's input batch when
the two networks expect different mean/std, so one data pipeline feeds both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.models.backbone import Backbone
from kdzoo.models.weights import WeightsError, checkpoint_hyperparameters, load_backbone_state

__all__ = ["Teacher", "TeacherSpec", "build_teacher", "load_weights", "resolve_weights"]

TIMM_PRETRAINED = "timm"
HUB_PREFIX = "hub:"


@dataclass
class TeacherSpec:
    """Where a teacher comes from.

    Attributes:
        name: timm architecture, e.g. ``"resnet34"``.
        weights: a kdzoo Lightning checkpoint (``.ckpt``, its student is the teacher), a
            ``.safetensors`` file, a ``torch.save``-d state dict, a folder made by
            ``kdzoo hub export``, ``"hub:NAME"`` for a published kdzoo checkpoint (downloaded
            and verified into ``$KDZOO_HOME/hub``), or ``"timm"`` for timm's pretrained weights
            of ``name`` (e.g. ``name: resnet34.tv_in1k``; needs a network or a filled Hugging
            Face cache). ``None`` keeps the random initialisation, which is only useful in tests.
        mean: input mean the teacher's weights expect. ``None``: read it from the checkpoint's
            hyper-parameters, or timm's pretrained config for ``"timm"``, or else assume the
            student's.
        std: input std, as ``mean``.
        num_classes: teacher outputs; ``None`` means the dataset's number of classes.
        model_kwargs: extra ``timm.create_model`` arguments.
    """

    name: str
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] | None = None


class Teacher(nn.Module):
    """A frozen network that stays in eval mode and runs without autograd.

    ``backbone`` is a :class:`~kdzoo.models.backbone.Backbone` for classification methods, or a
    :class:`~kdzoo.models.segmentation.SegmentationModel` for segmentation ones.

    ``forward`` takes the batch normalised for the student and maps it to the teacher's
    normalisation with one affine op: ``x_t = x * (std_s / std_t) + (mean_s - mean_t) / std_t``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.renormalise = None not in (student_mean, student_std, teacher_mean, teacher_std) and (
            tuple(student_mean) != tuple(teacher_mean) or tuple(student_std) != tuple(teacher_std)
        )
        if self.renormalise:
            s_mean, s_std, t_mean, t_std = (
                torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                for v in (student_mean, student_std, teacher_mean, teacher_std)
            )
            # Not persistent: they follow from the config, and teachers are never checkpointed.
            self.register_buffer("scale", s_std / t_std, persistent=False)
            self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        # Lightning calls model.train() at every epoch start; a teacher never leaves eval mode
        # (BatchNorm statistics and dropout must stay those it was trained with).
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, indices: int | Sequence[int] | None = None) -> Any:
        if self.renormalise:
            # Only the image channels; extra input channels (LAD's label channel) follow them.
            k = self.scale.shape[1]
            image = x[:, :k] * self.scale.to(x.dtype) + self.shift.to(x.dtype)
            x = torch.cat([image, x[:, k:]], dim=1) if x.shape[1] > k else image
        if indices is None:  # also the call of networks without intermediate maps (segmentation)
            return self.backbone(x)
        return self.backbone(x, indices=indices)


def resolve_weights(weights: str) -> tuple[str, dict[str, Any]]:
    """The weight file behind ``weights`` and the input mean/std it records (if any).

    ``"hub:NAME"`` is downloaded (or found in the cache) and verified; an exported hub folder
    gives its ``model.safetensors`` and ``config.json``; any other value is a file path.
    """
    if weights.startswith(HUB_PREFIX):
        from kdzoo.hub import download

        return _exported_folder(download(weights[len(HUB_PREFIX) :]))
    if Path(weights).is_dir():
        return _exported_folder(Path(weights))
    return weights, checkpoint_hyperparameters(weights)


def _exported_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise WeightsError(
            f"{folder} is not a kdzoo hub folder: it needs model.safetensors and config.json "
            "(made by `kdzoo hub export`)"
        )
    cfg = json.loads(config.read_text()).get("pretrained_cfg", {})
    return str(weights), {"mean": cfg.get("mean"), "std": cfg.get("std")}


def build_teacher(
    spec: TeacherSpec,
    *,
    num_classes: int,
    in_chans: int,
    student_mean: Sequence[float] | None = None,
    student_std: Sequence[float] | None = None,
) -> Teacher:
    """Build the frozen teacher ``spec`` describes, its weights loaded and checked."""
    pretrained = spec.weights == TIMM_PRETRAINED
    backbone = Backbone(
        spec.name,
        num_classes=spec.num_classes or num_classes,
        in_chans=in_chans,
        pretrained=pretrained,
        model_kwargs=spec.model_kwargs,
    )
    teacher_mean, teacher_std = spec.mean, spec.std
    if pretrained:
        cfg = backbone.pretrained_cfg
        teacher_mean = teacher_mean or cfg.get("mean")
        teacher_std = teacher_std or cfg.get("std")
    elif spec.weights is not None:
        path, recorded = resolve_weights(spec.weights)
        load_weights(backbone, path)
        teacher_mean = teacher_mean or recorded.get("mean")
        teacher_std = teacher_std or recorded.get("std")
    return Teacher(
        backbone,
        student_mean=student_mean,
        student_std=student_std,
        teacher_mean=teacher_mean or student_mean,
        teacher_std=teacher_std or student_std,
    )


def load_weights(backbone: Backbone, weights: str) -> None:
    """Load a weight file (see :func:`~kdzoo.models.weights.load_backbone_state`) into
    ``backbone``, raising a :class:`WeightsError` that names the mismatch if it does not fit."""
    state = load_backbone_state(weights)
    expected = backbone.model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        classifier = backbone.model.get_classifier()
        file_classes = _classifier_outputs(state, backbone)
        hint = ""
        if file_classes is not None and file_classes != backbone.num_classes:
            hint = (
                f" The teacher in {weights} predicts {file_classes} classes but the model was "
                f"built for {backbone.num_classes} ({type(classifier).__name__} head): teacher "
                "and student must be trained on the same label set (or set teacher.num_classes)."
            )
        raise WeightsError(
            f"teacher weights {weights} do not fit timm model {backbone.name!r}.{hint} "
            f"Mismatched tensors: {'; '.join(mismatched[:3])}"
        )
    missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"teacher weights {weights} do not match timm model {backbone.name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). Is teacher.name the architecture the file was trained with?"
        )


def _classifier_outputs(state: dict[str, torch.Tensor], backbone: Backbone) -> int | None:
    """Number of classes the classifier in ``state`` predicts, if it can be found."""
    head = backbone.model.get_classifier()
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    for name, param in backbone.model.named_parameters():
        if param is weight and name in state:
            return state[name].shape[0]
    return None
