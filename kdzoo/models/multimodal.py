"""Encoders and classifiers for paired-modality data: a unimodal net and an intermediate-fusion net.

The networks of MST-Distill's cross-modal setting ("MST-Distill: Mixture of Specialized Teachers
for Cross-Modal Knowledge Distillation", ACM MM 2025, arXiv:2507.07015; code
github.com/Gray-OREO/MST-Distill, ``models/``): every modality has an encoder that ends in a pooled
feature vector; a :class:`UnimodalNet` puts a head on one encoder, a :class:`FusionNet`
concatenates the two pooled features (through an ``nn.Identity`` named ``concat_identity``, the
hook point of the repo's AV-MNIST teacher) and puts a head on the concatenation. The head is
``fc1, fc2, ..., classifier`` with the ReLU applied in ``forward`` after each ``fcK``, as in the
repo's ``MLPs.py``/``SeqNets.py``, so a forward hook on ``fcK`` sees the pre-activation.

An encoder is described by a plain dict (YAML friendly), one per modality:

- ``{"kind": "timm", "name": "resnet18", "kwargs": {...}, "pretrained": False}``: a timm
  backbone built with ``num_classes=0`` (its forward returns the pooled feature) and ``in_chans``
  from the modality's ``(C, H, W)`` shape;
- ``{"kind": "mlp", "hidden": [1024, 512]}``: Linear-ReLU layers ``fc1, fc2, ...`` over a ``(D,)``
  vector (the repo's CrisisMMD branches on pre-extracted ResNet-50 / BERTweet features);
- ``{"kind": "conv1d", "channels": [32, 64], "kernel_size": 3}``: Conv1d-BatchNorm-ReLU layers
  ``conv1, conv2, ...`` over a ``(C, L)`` sequence, then global average pooling over ``L`` (a
  sketch of the repo's 1-D audio branches, which flatten instead of pooling).

Hookable layers are ``named_modules()`` names; the useful ones are ``fc1, fc2, ...``
(pre-activations of the head), ``concat_identity`` (fusion only), and inside the encoders
``encoder.<layer>`` (unimodal) or ``encoders.<0|1>.<layer>`` (fusion), e.g. ``encoder.fc1`` of an
MLP, ``encoder.conv2`` of a conv1d encoder or ``encoder.model.layer3`` of a timm ResNet.
:func:`hook_point_names` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError

__all__ = [
    "Conv1dEncoder",
    "FusionNet",
    "MLPEncoder",
    "TimmEncoder",
    "UnimodalNet",
    "build_encoder",
    "hook_point_names",
]

ENCODER_KINDS = ("timm", "mlp", "conv1d")
_ENCODER_KEYS = {
    "timm": ("name", "kwargs", "pretrained"),
    "mlp": ("hidden",),
    "conv1d": ("channels", "kernel_size"),
}


class MLPEncoder(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ReLU ...`` over a ``(N, D)`` vector; ``out_dim`` the last width."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = [in_dim, *hidden]
        self.depth = len(hidden)
        for i in range(self.depth):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x


class Conv1dEncoder(nn.Module):
    """``conv{i} -> bn{i} -> ReLU`` over a ``(N, C, L)`` sequence, then the mean over ``L``."""

    def __init__(self, in_channels: int, channels: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.depth = len(channels)
        for i in range(self.depth):
            conv = nn.Conv1d(widths[i], widths[i + 1], kernel_size, padding=kernel_size // 2)
            self.add_module(f"conv{i + 1}", conv)
            self.add_module(f"bn{i + 1}", nn.BatchNorm1d(widths[i + 1]))
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = F.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(x)))
        return x.mean(dim=-1)


class TimmEncoder(nn.Module):
    """A timm backbone without classifier (``num_classes=0``): its forward is the pooled feature."""

    def __init__(
        self,
        name: str,
        in_chans: int,
        pretrained: bool = False,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ConfigError(
                f"unknown timm model {name!r} in an encoder spec: see "
                f"`timm.list_models('{name.split('.')[0][:4]}*')` for names that exist"
            )
        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **dict(kwargs or {})
        )
        # Models with a pre-logits stage (ConvNeXt, ...) return head_hidden_size features.
        self.out_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_encoder(spec: Mapping[str, Any], in_shape: Sequence[int]) -> nn.Module:
    """The encoder ``spec`` describes for per-sample inputs of shape ``in_shape``; it has an
    ``out_dim`` attribute (the width of its pooled feature)."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in ENCODER_KINDS:
        raise ConfigError(
            f"an encoder spec must be a dict with kind in {ENCODER_KINDS}, got {spec!r} "
            '(e.g. {"kind": "mlp", "hidden": [1024, 512]})'
        )
    kind, shape = spec["kind"], tuple(int(s) for s in in_shape)
    expected = {"timm": 3, "mlp": 1, "conv1d": 2}[kind]
    if len(shape) != expected:
        layouts = {"timm": "(C, H, W)", "mlp": "(D,)", "conv1d": "(C, L)"}
        raise ConfigError(
            f"a {kind!r} encoder needs {layouts[kind]} inputs but the modality's per-sample shape "
            f"is {shape}: pick the encoder kind that fits the data ("
            + ", ".join(f"{k}: {v}" for k, v in layouts.items())
            + ")"
        )
    unknown = set(spec) - {"kind", *_ENCODER_KEYS[kind]}
    if unknown:
        raise ConfigError(
            f"unknown keys {sorted(unknown)} in the {kind!r} encoder spec; "
            f"it takes {sorted(_ENCODER_KEYS[kind])}"
        )
    if kind == "timm":
        if "name" not in spec:
            raise ConfigError('a "timm" encoder spec needs a "name", e.g. "resnet18"')
        return TimmEncoder(
            spec["name"], shape[0], spec.get("pretrained", False), spec.get("kwargs")
        )
    if kind == "mlp":
        return MLPEncoder(shape[0], _widths(spec.get("hidden", ()), "hidden"))
    channels = _widths(spec.get("channels", ()), "channels")
    if not channels:
        raise ConfigError('a "conv1d" encoder needs at least one entry in "channels"')
    return Conv1dEncoder(shape[0], channels, int(spec.get("kernel_size", 3)))


def _widths(values: Sequence[int], what: str) -> list[int]:
    widths = [int(v) for v in values]
    if any(w < 1 for w in widths):
        raise ConfigError(f"{what} must be positive layer widths, got {list(values)}")
    return widths


class _HeadNet(nn.Module):
    """Adds the head ``fc1 .. fcK, classifier`` (ReLU after each ``fcK``, applied in forward)."""

    def _build_head(self, in_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        widths = [in_dim, *_widths(hidden, "head_hidden")]
        self.head_depth = len(widths) - 1
        for i in range(self.head_depth):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.num_classes = num_classes

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.head_depth):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return self.classifier(x)


class UnimodalNet(_HeadNet):
    """Encoder on one modality + head; ``forward(x)`` returns ``(N, num_classes)`` logits.

    Args:
        encoder: the encoder spec (see the module docstring).
        in_shape: per-sample input shape, e.g. ``(1, 28, 28)`` or ``(768,)``.
        num_classes: classifier outputs.
        head_hidden: widths of ``fc1, fc2, ...`` before the classifier (``[]``: classifier only).
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        in_shape: Sequence[int],
        num_classes: int,
        head_hidden: Sequence[int] = (320, 160),
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(encoder, in_shape)
        self._build_head(self.encoder.out_dim, head_hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.encoder(x))


class FusionNet(_HeadNet):
    """Intermediate fusion: two encoders, their pooled features concatenated, then the head;
    ``forward(x_m1, x_m2)`` returns ``(N, num_classes)`` logits.

    Args:
        encoders: one encoder spec per modality.
        in_shapes: per-sample input shape per modality.
        num_classes: classifier outputs.
        head_hidden: widths of ``fc1, fc2, ...`` after the concatenation.
    """

    def __init__(
        self,
        encoders: Sequence[Mapping[str, Any]],
        in_shapes: Sequence[Sequence[int]],
        num_classes: int,
        head_hidden: Sequence[int] = (320, 160),
    ) -> None:
        super().__init__()
        if len(encoders) != 2 or len(in_shapes) != 2:
            raise ConfigError(
                f"a fusion net needs two encoder specs and two input shapes (one per modality), "
                f"got {len(encoders)} and {len(in_shapes)}"
            )
        pairs = zip(encoders, in_shapes, strict=True)
        self.encoders = nn.ModuleList(build_encoder(spec, shape) for spec, shape in pairs)
        # A named no-op: the repo's hook point on the fused feature (AV-MNIST's teacher).
        self.concat_identity = nn.Identity()
        width = sum(e.out_dim for e in self.encoders)
        self._build_head(width, head_hidden, num_classes)

    def forward(self, x_m1: torch.Tensor, x_m2: torch.Tensor) -> torch.Tensor:
        features = [enc(x) for enc, x in zip(self.encoders, (x_m1, x_m2), strict=True)]
        return self._head(self.concat_identity(torch.cat(features, dim=1)))


def hook_point_names(network: nn.Module, max_depth: int = 3) -> list[str]:
    """The ``named_modules()`` names of ``network`` at most ``max_depth`` levels deep (the head
    layers, ``concat_identity`` and the encoders' main layers); any deeper name works too."""
    return [name for name, _ in network.named_modules() if name and name.count(".") < max_depth]
