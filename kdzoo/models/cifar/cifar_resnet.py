"""CIFAR ResNets of the CRD / mdistiller KD benchmark: ``resnet8`` ... ``resnet110``, ``resnet8x4``,
``resnet32x4``.

Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385 (the 6n+2 CIFAR ResNets of its section 4.2). Benchmark: Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/resnet.py`` (commit eedab9d,
read from a stored copy; the same definitions are in megvii-research/mdistiller
``mdistiller/models/cifar/resnet.py``), none of it copied: a 3x3 stem conv-BN-ReLU at full
resolution, then three stages of n = (depth - 2) / 6 post-activation BasicBlocks at strides 1, 2, 2
with a 1x1 conv-BN projection shortcut where the shape changes, global average pool, linear.
Widths 16/16/32/64 for ``resnetN``; 32/64/128/256 for the ``x4`` nets (stem 32, stages 64, 128,
256). Attribute names follow CRD (``conv1``, ``bn1``, ``layer1``..``layer3``, ``fc``) so CRD
checkpoints load as they are. CRD's blocks also return the pre-ReLU sum ("preact") for some KD
methods; that is not exposed here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(CifarNet):
    """CRD's CIFAR ResNet with BasicBlocks.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        num_filters: stem width, then the widths of the three stages.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
    """

    def __init__(
        self,
        depth: int,
        num_filters: tuple[int, int, int, int],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=num_filters[0], reduction=1, module="relu")]
        inplanes, reduction = num_filters[0], 1
        for i, (planes, stride) in enumerate(zip(num_filters[1:], (1, 2, 2), strict=True), start=1):
            layers = [BasicBlock(inplanes, planes, stride)]
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inplanes, reduction = planes, reduction * stride
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=f"layer{i}"))
        self.num_features = inplanes
        self._init_head(num_classes, drop_rate, global_pool)

        # CRD's initialisation (the linear layer keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.relu(self.bn1(self.conv1(x)))
        return self.get_submodule(f"layer{index}")(x)


default_cfgs = generate_default_cfgs(
    {
        name: cifar_cfg()
        for name in (
            "resnet8",
            "resnet14",
            "resnet20",
            "resnet32",
            "resnet44",
            "resnet56",
            "resnet110",
            "resnet8x4",
            "resnet32x4",
        )
    }
)

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, num_stages=4, **kwargs)


@register_model
def resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-8 (CRD ``resnet8``): 1 block per stage, widths 16/16/32/64."""
    return _create("resnet8", pretrained, **dict(depth=8, num_filters=_NARROW, **kwargs))


@register_model
def resnet14(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-14 (CRD ``resnet14``): 2 blocks per stage, widths 16/16/32/64."""
    return _create("resnet14", pretrained, **dict(depth=14, num_filters=_NARROW, **kwargs))


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (CRD ``resnet20``): 3 blocks per stage, widths 16/16/32/64."""
    return _create("resnet20", pretrained, **dict(depth=20, num_filters=_NARROW, **kwargs))


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (CRD ``resnet32``): 5 blocks per stage, widths 16/16/32/64."""
    return _create("resnet32", pretrained, **dict(depth=32, num_filters=_NARROW, **kwargs))


@register_model
def resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (CRD ``resnet44``): 7 blocks per stage, widths 16/16/32/64."""
    return _create("resnet44", pretrained, **dict(depth=44, num_filters=_NARROW, **kwargs))


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (CRD ``resnet56``): 9 blocks per stage, widths 16/16/32/64."""
    return _create("resnet56", pretrained, **dict(depth=56, num_filters=_NARROW, **kwargs))


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (CRD ``resnet110``): 18 blocks per stage, widths 16/16/32/64."""
    return _create("resnet110", pretrained, **dict(depth=110, num_filters=_NARROW, **kwargs))


@register_model
def resnet8x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-8x4 (CRD ``resnet8x4``): 1 block per stage, widths 32/64/128/256."""
    return _create("resnet8x4", pretrained, **dict(depth=8, num_filters=_WIDE, **kwargs))


@register_model
def resnet32x4(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32x4 (CRD ``resnet32x4``): 5 blocks per stage, widths 32/64/128/256."""
    return _create("resnet32x4", pretrained, **dict(depth=32, num_filters=_WIDE, **kwargs))
