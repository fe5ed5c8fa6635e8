"""ShuffleNets of the CRD / mdistiller KD benchmark: ``shufflenetv1_cifar`` (CRD ``ShuffleV1``) and
``shufflenetv2_cifar`` (CRD ``ShuffleV2``).

Papers: Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018, arXiv:1707.01083; Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical
Guidelines for Efficient CNN Architecture Design", ECCV 2018, arXiv:1807.11164. Benchmark: Tian,
Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/ShuffleNetv1.py`` and
``models/ShuffleNetv2.py`` (commit eedab9d, read from a stored copy; mdistiller reuses them), none
of it copied. Both start with a 1x1 (sic: not 3x3) conv-BN-ReLU stem to 24 channels at full
resolution and have three stages at stride 2 each.

* V1: groups g = 3, stage widths 240/480/960 with 4/8/4 bottlenecks (1x1 group conv-BN-ReLU,
  channel shuffle, 3x3 depthwise conv-BN-ReLU, 1x1 group conv-BN; the first block of a stage
  concatenates a 3x3 stride-2 average-pooled shortcut, the others add an identity; ReLU after).
  The very first 1x1 conv (on the 24-channel stem) is not grouped. Global average pool, linear.
* V2 (net size 1.0): stage widths 116/232/464, each a down-sampling block followed by 3/7/3 basic
  blocks (channel split, 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU on one half, concat, shuffle
  with 2 groups), then a 1x1 conv-BN-ReLU to 1024 channels (part of ``forward_features``, so
  ``num_features`` is 1024), global average pool, linear.

Attribute names follow CRD (``conv1``, ``bn1``, ``layer1``..``layer3``, ``conv2``, ``bn2``,
``linear``) so CRD checkpoints load as they are. The timm names ``shufflenet*`` are free, but the
CRD names (``ShuffleV1``) are not timm style, hence the ``_cifar`` names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarShuffleNetV1", "CifarShuffleNetV2"]

_STEM_CHS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, g*c, H, W) -> (N, c*g, H, W)``: interleave the channels of the ``groups`` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """ShuffleNet unit; with stride 2 the output concatenates the pooled input (``out_planes``
    counts only the new channels)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        # CRD: the first pointwise conv, on the stem's 24 channels, is not grouped.
        self.groups1 = 1 if in_planes == _STEM_CHS else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class CifarShuffleNetV1(CifarNet):
    """CRD's CIFAR ShuffleNet (V1).

    Args:
        out_planes: widths of the three stages.
        num_blocks: blocks per stage.
        groups: group count of the pointwise convs.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
    """

    classifier_name = "linear"

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.feature_info = [dict(num_chs=_STEM_CHS, reduction=1, module="bn1")]
        in_planes = _STEM_CHS
        for i, (planes, blocks) in enumerate(zip(out_planes, num_blocks, strict=True), start=1):
            layers = [ShuffleV1Block(in_planes, planes - in_planes, 2, groups)]
            layers += [ShuffleV1Block(planes, planes, 1, groups) for _ in range(1, blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            in_planes = planes
            self.feature_info.append(dict(num_chs=planes, reduction=2**i, module=f"layer{i}"))
        self.num_features = in_planes
        self._init_head(num_classes, drop_rate, global_pool)
        # CRD keeps PyTorch's default initialisation for both ShuffleNets.

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return F.relu(self.bn1(self.conv1(x)))
        return self.get_submodule(f"layer{index}")(x)


class ShuffleV2Block(nn.Module):
    """Basic unit: keep half the channels, transform the other half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Down-sampling unit: two stride-2 branches of ``out_channels // 2`` each, concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left: 3x3 depthwise (stride 2)-BN, 1x1-BN-ReLU
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1-BN-ReLU, 3x3 depthwise (stride 2)-BN, 1x1-BN-ReLU
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(CifarNet):
    """CRD's CIFAR ShuffleNetV2.

    Args:
        out_channels: widths of the three stages, then of the final 1x1 conv.
        num_blocks: basic blocks per stage (after its down-sampling block).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
    """

    classifier_name = "linear"

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.feature_info = [dict(num_chs=_STEM_CHS, reduction=1, module="bn1")]
        in_chs = _STEM_CHS
        for i, (chs, blocks) in enumerate(zip(out_channels[:3], num_blocks, strict=True), start=1):
            layers = [ShuffleV2DownBlock(in_chs, chs)]
            layers += [ShuffleV2Block(chs) for _ in range(blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            in_chs = chs
            self.feature_info.append(dict(num_chs=chs, reduction=2**i, module=f"layer{i}"))
        self.conv2 = nn.Conv2d(in_chs, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.num_features = out_channels[3]
        self._init_head(num_classes, drop_rate, global_pool)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return F.relu(self.bn1(self.conv1(x)))
        return self.get_submodule(f"layer{index}")(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return cifar_cfg(pool_size=(4, 4), classifier="linear", **kwargs)


default_cfgs = generate_default_cfgs({"shufflenetv1_cifar": _cfg(), "shufflenetv2_cifar": _cfg()})


@register_model
def shufflenetv1_cifar(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV1:
    """CIFAR ShuffleNet, g = 3, widths 240/480/960 (CRD ``ShuffleV1``)."""
    return build_cifar_model(
        CifarShuffleNetV1, "shufflenetv1_cifar", pretrained, num_stages=4, **kwargs
    )


@register_model
def shufflenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV2:
    """CIFAR ShuffleNetV2 1.0x, widths 116/232/464, head 1024 (CRD ``ShuffleV2``)."""
    return build_cifar_model(
        CifarShuffleNetV2, "shufflenetv2_cifar", pretrained, num_stages=4, **kwargs
    )
