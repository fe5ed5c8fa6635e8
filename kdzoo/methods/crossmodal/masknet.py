"""MST-Distill's plug-in masking modules and the forward hook that applies them.

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015; code github.com/Gray-OREO/MST-Distill, ``KD_methods/MST.py``
(``MaskNet_1d``, ``MaskNet_2d``, ``SpatialReduction``, ``hook_fn``), which this file follows:

- a MaskNet maps one teacher feature ``f`` to a per-channel soft mask ``m in (0, 1)^C``: the
  ``C`` channels are the tokens (one Linear ``C -> C*h`` embeds the vector, reshaped to ``C``
  tokens of width ``h``), one multi-head self-attention layer mixes them, a shared Linear
  ``h -> 1`` and a sigmoid give the mask;
- maps ``(C, H, W)`` are first reduced to ``(C,)`` (depthwise 3x3 stride-2 conv, 1x1 conv,
  BatchNorm, ReLU, global average pooling); the mask is then the same at every position;
- the hook replaces the layer's output by ``m * f`` inside the teacher's forward pass.

Deviations: a ``(C, 1, 1)`` output keeps its shape after masking (the repo returns it squeezed);
``(C, L)`` sequences are masked like ``(C, L, 1)`` maps (the repo has no such hook point); the
hidden width is at least ``heads`` so that tiny layers still get a MaskNet.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.multimodal import hook_point_names

__all__ = [
    "MaskNet1d",
    "MaskNet2d",
    "apply_mask",
    "build_masknet",
    "find_layer",
    "layer_output_shape",
    "mask_hidden_dim",
    "masked_layer",
]


def mask_hidden_dim(channels: int, heads: int = 3, factor: int = 2) -> int:
    """Token width ``h = floor(C / (factor * heads)) * heads`` (the repo's rule: about ``C/2``,
    a multiple of ``heads``; 320 -> 159, 160 -> 78, 596 -> 297), at least ``heads``."""
    return max(heads, channels // (factor * heads) * heads)


class MaskNet1d(nn.Module):
    """Per-channel soft mask of a ``(N, C)`` feature: ``(N, C)`` values in ``(0, 1)``.

    The embedding Linear has ``C * h * C`` weights (about ``C^3 / 2``: 105.7 M at ``C = 596``);
    hook narrow layers, or raise ``factor``.

    Args:
        channels: ``C``.
        heads: attention heads (repo: 3).
        factor: hidden-width divisor, see :func:`mask_hidden_dim` (repo: 2).
    """

    def __init__(self, channels: int, heads: int = 3, factor: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = mask_hidden_dim(channels, heads, factor)
        self.embed = nn.Linear(channels, channels * self.hidden)
        self.attn = nn.MultiheadAttention(self.hidden, heads, batch_first=True)
        self.fc = nn.Linear(self.hidden, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(f).view(f.shape[0], self.channels, self.hidden)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.fc(mixed).squeeze(-1))


class MaskNet2d(MaskNet1d):
    """Per-channel soft mask of a ``(N, C, H, W)`` (or ``(N, C, L)``) map: ``(N, C)`` values in
    ``(0, 1)``, one per channel for every position. Arguments as :class:`MaskNet1d`."""

    def __init__(self, channels: int, heads: int = 3, factor: int = 2) -> None:
        super().__init__(channels, heads, factor)
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim == 3:
            f = f.unsqueeze(-1)
        return super().forward(self.reduce(f))


def build_masknet(shape: Sequence[int], heads: int = 3, factor: int = 2) -> MaskNet1d:
    """The MaskNet for a per-sample feature ``shape``: 1-D for ``(C,)`` and ``(C, 1, 1)`` (as
    the repo), 2-D for ``(C, H, W)`` and ``(C, L)``."""
    shape = tuple(shape)
    if len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
        return MaskNet1d(shape[0], heads, factor)
    if len(shape) in (2, 3):
        return MaskNet2d(shape[0], heads, factor)
    raise ConfigError(
        f"a MaskNet masks (C,), (C, L) or (C, H, W) features, but the hooked layer outputs "
        f"{shape} per sample: hook another layer"
    )


def apply_mask(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m * f`` with the ``(N, C)`` mask broadcast over every position of ``feature``."""
    return feature * mask.view(*mask.shape, *([1] * (feature.ndim - 2))).to(feature.dtype)


def find_layer(network: nn.Module, name: str) -> nn.Module:
    """``network.get_submodule(name)``, or a :class:`ConfigError` listing the available names."""
    try:
        return network.get_submodule(name)
    except AttributeError:
        names = hook_point_names(network)
        raise ConfigError(
            f"no layer named {name!r} in {type(network).__name__} to hook a MaskNet into; "
            f"available layers: {', '.join(names[:60])}{', ...' if len(names) > 60 else ''}"
        ) from None


@contextmanager
def masked_layer(network: nn.Module, layer: str, masknet: nn.Module) -> Iterator[None]:
    """Within the block, the output ``f`` of ``network.<layer>`` is replaced by ``m * f`` with
    ``m = masknet(f)``; the hook is removed on exit (the repo's ``hook_builder`` /
    ``hooks_remover``), also when the block raises."""

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        squeeze = output.ndim == 4 and output.shape[-2:] == (1, 1)
        mask = masknet(output.flatten(1) if squeeze else output)
        return apply_mask(output, mask)

    handle = find_layer(network, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_output_shape(
    network: nn.Module, layer: str, inputs: Sequence[torch.Tensor]
) -> tuple[int, ...]:
    """Per-sample shape of ``network.<layer>``'s output on ``inputs`` (one eval-mode pass, so
    BatchNorm statistics are not touched)."""
    shapes: list[tuple[int, ...]] = []
    handle = find_layer(network, layer).register_forward_hook(
        lambda module, args, output: shapes.append(tuple(output.shape[1:]))
    )
    was_training = network.training
    try:
        network.eval()
        network(*inputs)
    finally:
        handle.remove()
        network.train(was_training)
    if not shapes:
        raise ConfigError(f"layer {layer!r} is not used in {type(network).__name__}'s forward")
    return shapes[0]
