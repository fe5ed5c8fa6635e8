"""Light segmentation heads over a list of backbone stage maps (mmsegmentation / CIRKD conventions).

Every head reads the stage maps it needs from the backbone's list (``in_index``, as in mmseg's
decode heads) and returns logits at the resolution of its finest input map, *not* upsampled:
callers upsample in the loss or metric (bilinear, ``align_corners=False``).

- :class:`FCNHead`: Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
  Segmentation", CVPR 2015, arXiv:1411.4038 (mmseg's ``FCNHead`` with ``num_convs=2`` and no
  ``concat_input``). Also the auxiliary head on the second-to-last stage (CIRKD/LAD: 3x3 conv to
  C/4, one conv only).
- :class:`ASPPHead`: Chen et al., "Rethinking Atrous Convolution for Semantic Image
  Segmentation" (DeepLabV3), arXiv:1706.05587, laid out as CIRKD's ``_DeepLabHead``
  (github.com/winycg/CIRKD, ``models/deeplabv3.py``).
- :class:`PSPHead`: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, arXiv:1612.01105.
- :class:`FPNHead`: Kirillov et al., "Panoptic Feature Pyramid Networks" (semantic FPN), CVPR
  2019, arXiv:1901.02446, over a Lin et al. FPN (CVPR 2017, arXiv:1612.03144); a light variant
  (one smoothing conv per level, levels summed at 1/4).

Batch size 1 in train mode: BatchNorm cannot normalise a 1x1 map of a single image (PyTorch
raises "Expected more than 1 value per channel"). The branches that pool to 1x1 (ASPP's image
pooling, PSP's bin 1) therefore use a biased 1x1 conv + ReLU *without* normalisation, where mmseg
and CIRKD use BN. Larger pooled maps (PSP bins 2, 3, 6) keep BN. This costs nothing at batch 16
and makes every head trainable with batch 1 (e.g. full-resolution Cityscapes crops on one GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "ASPPHead", "FCNHead", "FPNHead", "PSPHead", "aspp_rates", "build_head"]

HEADS = ("fcn", "deeplabv3", "psp", "fpn")


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (``align_corners=False``, the zoo's convention); a no-op when
    the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
    """Conv (no bias: BN follows) -> BatchNorm -> ReLU, 'same' padding for odd kernels."""
    padding = dilation * (kernel_size - 1) // 2
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def pooled_branch(in_channels: int, out_channels: int, bins: int) -> nn.Sequential:
    """Adaptive average pool to ``bins x bins`` -> 1x1 conv -> (BN if bins > 1) -> ReLU.

    No BN on the 1x1 map: see the module docstring (batch size 1 in train mode).
    """
    if bins == 1:
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=True),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(nn.AdaptiveAvgPool2d(bins), conv_bn_relu(in_channels, out_channels, 1))


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d -> 1x1 conv to the classes, initialised N(0, 0.01^2) with zero bias (mmseg's
    ``conv_seg`` init: small initial logits, so the first losses are near log(num_classes))."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


def init_convs(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for the head's hidden convs, as mmcv's ``ConvModule``; the
    classifier keeps its own init (it is the last conv of each ``classifier``)."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d) and not name.startswith("cls"):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
            if child.bias is not None:
                nn.init.zeros_(child.bias)


def aspp_rates(stride: int) -> tuple[int, int, int]:
    """DeepLabV3 atrous rates for a feature stride: (6, 12, 18) at 16, scaled with 16 / stride,
    i.e. (12, 24, 36) at 8 and (3, 6, 9) at 32 (Chen et al. 2017, section 4.1)."""
    return tuple(max(1, rate * 16 // stride) for rate in (6, 12, 18))  # type: ignore[return-value]


class FCNHead(nn.Module):
    """``num_convs`` x (3x3 conv-BN-ReLU) -> dropout -> 1x1 classifier, on one stage map.

    Args:
        in_channels: channels of the stage map.
        channels: hidden width.
        num_classes: output channels.
        dropout: ``Dropout2d`` probability before the classifier.
        num_convs: hidden 3x3 convs (2 for the main FCN head as in mmseg, 1 for the aux head).
        in_index: which stage map of the backbone's list to read (``-1``: last, ``-2``: aux).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float,
        *,
        num_convs: int = 2,
        in_index: int = -1,
    ) -> None:
        super().__init__()
        self.in_index = in_index
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(conv_bn_relu(a, b, 3) for a, b in pairwise(widths)))
        self.cls = classifier(channels, num_classes, dropout)
        init_convs(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls(self.convs(features[self.in_index]))


class ASPPHead(nn.Module):
    """DeepLabV3: atrous spatial pyramid pooling on the last stage map.

    Five branches (1x1 conv, three 3x3 atrous convs at ``rates``, image pooling), concatenated ->
    1x1 projection BN-ReLU -> dropout -> 3x3 conv BN-ReLU -> dropout -> 1x1 classifier (CIRKD's
    ``_DeepLabHead`` layout, which LAD uses).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float,
        rates: Sequence[int],
    ) -> None:
        super().__init__()
        self.in_index = -1
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)]
            + [conv_bn_relu(in_channels, channels, 3, dilation=rate) for rate in self.rates]
        )
        self.image_pool = pooled_branch(in_channels, channels, 1)
        self.project = nn.Sequential(
            conv_bn_relu((len(self.rates) + 2) * channels, channels, 1), nn.Dropout2d(dropout)
        )
        self.bottleneck = conv_bn_relu(channels, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)
        init_convs(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[self.in_index]
        outs = [branch(x) for branch in self.branches]
        outs.append(resize(self.image_pool(x), x.shape[-2:]))
        return self.cls(self.bottleneck(self.project(torch.cat(outs, dim=1))))


class PSPHead(nn.Module):
    """PSPNet: pyramid pooling (bins 1, 2, 3, 6; each to ``C/4`` channels), concatenated with the
    input map -> 3x3 conv BN-ReLU -> dropout -> 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float,
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.in_index = -1
        self.bins = tuple(bins)
        pooled = max(1, in_channels // 4)
        self.stages = nn.ModuleList(pooled_branch(in_channels, pooled, b) for b in self.bins)
        self.bottleneck = conv_bn_relu(in_channels + pooled * len(self.bins), channels, 3)
        self.cls = classifier(channels, num_classes, dropout)
        init_convs(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[self.in_index]
        outs = [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.cls(self.bottleneck(torch.cat(outs, dim=1)))


class FPNHead(nn.Module):
    """Semantic FPN over the stage maps ``in_index`` (finest first).

    Lateral 1x1 convs -> top-down pathway (upsample coarser level, add) -> 3x3 smoothing conv per
    level -> upsample every level to the finest one and sum -> 3x3 conv BN-ReLU -> dropout -> 1x1
    classifier. Output at the finest level's resolution (1/4 for timm CNNs). Lateral and
    smoothing convs carry a bias and no norm, as mmseg's ``FPN`` neck with its default config.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        dropout: float,
        in_index: Sequence[int],
    ) -> None:
        super().__init__()
        self.in_index = tuple(in_index)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels
        )
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)
        init_convs(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = [conv(features[i]) for conv, i in zip(self.lateral, self.in_index, strict=True)]
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context into finer levels
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        size = levels[0].shape[-2:]
        fused = sum(
            resize(conv(level), size) for conv, level in zip(self.smooth, levels, strict=True)
        )
        return self.cls(self.fuse(fused))


def fpn_levels(reductions: Sequence[int], max_levels: int = 4) -> list[int]:
    """Indices of the last ``max_levels`` stages with reduction >= 4 (the stride-2 stem stage of
    timm CNNs is too fine and too shallow for a pyramid level)."""
    usable = [i for i, r in enumerate(reductions) if r >= 4] or list(range(len(reductions)))
    return usable[-max_levels:]


def build_head(
    name: str,
    channels: Sequence[int],
    reductions: Sequence[int],
    num_classes: int,
    head_channels: int,
    dropout: float,
) -> nn.Module:
    """The head ``name`` (one of :data:`HEADS`) over stages with these channels and reductions."""
    if name == "fcn":
        return FCNHead(channels[-1], head_channels, num_classes, dropout)
    if name == "deeplabv3":
        rates = aspp_rates(reductions[-1])
        return ASPPHead(channels[-1], head_channels, num_classes, dropout, rates)
    if name == "psp":
        return PSPHead(channels[-1], head_channels, num_classes, dropout)
    if name == "fpn":
        index = fpn_levels(reductions)
        return FPNHead([channels[i] for i in index], head_channels, num_classes, dropout, index)
    raise ValueError(f"unknown head {name!r}; expected one of {HEADS}")
