"""Wide ResNets of the CRD / mdistiller KD benchmark: ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``,
``wrn_40_2``.

Paper: Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146. Benchmark:
Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/wrn.py`` (commit eedab9d,
read from a stored copy; mdistiller reuses it), none of it copied: a plain 3x3 stem conv (16
channels), three groups of n = (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-
conv3x3; when the width or stride changes, the BN-ReLU'd input also feeds a 1x1 shortcut conv) of
widths 16k, 32k, 64k at strides 1, 2, 2, then BN-ReLU, global average pool, linear. Attribute names
follow CRD (``conv1``, ``block1.layer.0.bn1``, ``convShortcut``, ``bn1``, ``fc``) so CRD checkpoints
load as they are.

timm convention: the final BN-ReLU is part of ``forward_features`` (as in timm's pre-activation
ResNetV2), while the last intermediate map is the raw output of the third group (CRD's ``f3``);
``forward_intermediates(norm=True)`` applies the final BN-ReLU to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block; ``drop_rate`` is dropout between the two convs (CRD's ``dropRate``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # CRD decides the shortcut on the width only (a stride change always comes with one).
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # With a projection, the shortcut also starts from the pre-activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A group of blocks; exists for CRD's ``block<i>.layer.<j>`` state-dict keys."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop: float):
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, drop)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop) for _ in range(1, num_layers)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """CRD's WRN-depth-k for CIFAR.

    Args:
        depth: 6n + 4 (16, 40).
        widen_factor: k, the width multiplier of the three groups.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (timm's meaning; CRD uses none).
        block_drop_rate: dropout inside each block (CRD's ``dropRate``, 0 in the benchmark).
        global_pool: timm pool type for the head.
    """

    final_is_norm = True

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="conv1")]
        reduction = 1
        for i, stride in enumerate((1, 2, 2), start=1):
            block = NetworkBlock(n, widths[i - 1], widths[i], stride, block_drop_rate)
            setattr(self, f"block{i}", block)
            reduction *= stride
            self.feature_info.append(
                dict(num_chs=widths[i], reduction=reduction, module=f"block{i}")
            )
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = widths[3]
        self._init_head(num_classes, drop_rate, global_pool)

        # CRD's initialisation: He-normal (fan-out) convs, unit BN, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.conv1(x)
        return self.get_submodule(f"block{index}")(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


default_cfgs = generate_default_cfgs(
    {name: cifar_cfg() for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")}
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> WideResNet:
    return build_cifar_model(WideResNet, variant, pretrained, num_stages=4, **kwargs)


@register_model
def wrn_16_1(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-1 (CRD ``wrn_16_1``): 2 blocks per group, widths 16/32/64."""
    return _create("wrn_16_1", pretrained, **dict(depth=16, widen_factor=1, **kwargs))


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2 (CRD ``wrn_16_2``): 2 blocks per group, widths 32/64/128."""
    return _create("wrn_16_2", pretrained, **dict(depth=16, widen_factor=2, **kwargs))


@register_model
def wrn_40_1(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-1 (CRD ``wrn_40_1``): 6 blocks per group, widths 16/32/64."""
    return _create("wrn_40_1", pretrained, **dict(depth=40, widen_factor=1, **kwargs))


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2 (CRD ``wrn_40_2``): 6 blocks per group, widths 32/64/128."""
    return _create("wrn_40_2", pretrained, **dict(depth=40, widen_factor=2, **kwargs))
