"""ImageNet-style ResNets at CIFAR resolution, of the CRD / mdistiller KD benchmark:
``resnet50_cifar`` (CRD ``ResNet50``, the teacher of the ResNet-50 -> MobileNetV2 pair; mdistiller's
checkpoint ``cifar_teachers/ResNet50_vanilla``), ``resnet18_cifar`` and ``resnet34_cifar`` (CRD
``ResNet18``, ``ResNet34``).

Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv:1512.03385 (the ImageNet ResNets of its table 1). Benchmark: Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/resnetv2.py`` (commit eedab9d,
read from a stored copy; megvii-research/mdistiller ``mdistiller/models/cifar/resnetv2.py`` defines
the same nets), none of it copied. The "v2" is CRD's file name, not a pre-activation ResNet (that
is timm's ``resnetv2``): these are post-activation ResNets with the ImageNet widths but a CIFAR
stem: a 3x3 stride-1 conv-BN-ReLU to 64 channels at full resolution (no 7x7 conv, no max-pool),
then four stages of widths 64/128/256/512 at strides 1/2/2/2, global average pool, linear.

* ``BasicBlock`` (expansion 1): conv3x3-BN-ReLU-conv3x3-BN, the stride on the first conv.
* ``Bottleneck`` (expansion 4): conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, the stride on the
  3x3 conv; stage outputs 256/512/1024/2048 channels.

Both add the input, through a 1x1 conv-BN projection (``shortcut``) where the stride or the width
changes (identity otherwise, which CRD writes as an empty ``nn.Sequential``: no weights either
way), then apply a ReLU. Blocks per stage: 2/2/2/2 (ResNet-18), 3/4/6/3 (ResNet-34 and -50).
Attribute names follow CRD (``conv1``, ``bn1``, ``layer1``..``layer4``, ``<block>.shortcut.0/1``,
``linear``) so CRD / mdistiller checkpoints load as they are. CRD's blocks also return the
pre-ReLU sum ("preact") for some KD methods; that is not exposed here.

Names: timm already registers the ImageNet ``resnet18``/``resnet34``/``resnet50`` (7x7 stem,
max-pool, ``fc``), hence the ``_cifar`` suffix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["BasicBlock", "Bottleneck", "CifarResNetV2"]

_STEM_CHS = 64
_WIDTHS = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """CRD's ``shortcut``: 1x1 conv-BN where the shape changes, identity otherwise."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, plus the (projected) input, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(CifarNet):
    """CRD's ``ResNet`` of ``models/resnetv2.py``: ImageNet ResNet widths with a CIFAR stem.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: blocks in each of the four stages.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
        zero_init_residual: zero the last BN's weight of every block, so that each block starts
            as an identity (CRD's option, off by default as in CRD).
    """

    classifier_name = "linear"

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHS, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHS)
        self.feature_info = [dict(num_chs=_STEM_CHS, reduction=1, module="bn1")]
        in_planes, reduction = _STEM_CHS, 1
        stages = zip(_WIDTHS, _STRIDES, num_blocks, strict=True)
        for i, (planes, stride, blocks) in enumerate(stages, start=1):
            layers = []
            for j in range(blocks):
                layers.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            reduction *= stride
            self.feature_info.append(
                dict(num_chs=in_planes, reduction=reduction, module=f"layer{i}")
            )
        self.num_features = in_planes
        self._init_head(num_classes, drop_rate, global_pool)

        # CRD's initialisation (the linear layer keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return F.relu(self.bn1(self.conv1(x)))
        return self.get_submodule(f"layer{index}")(x)


default_cfgs = generate_default_cfgs(
    {
        name: cifar_cfg(pool_size=(4, 4), classifier="linear")
        for name in ("resnet18_cifar", "resnet34_cifar", "resnet50_cifar")
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNetV2:
    return build_cifar_model(CifarResNetV2, variant, pretrained, num_stages=5, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNetV2:
    """CIFAR ResNet-18 (CRD ``ResNet18``): BasicBlocks 2/2/2/2, widths 64/128/256/512."""
    return _create(
        "resnet18_cifar", pretrained, **dict(block=BasicBlock, num_blocks=(2, 2, 2, 2), **kwargs)
    )


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNetV2:
    """CIFAR ResNet-34 (CRD ``ResNet34``): BasicBlocks 3/4/6/3, widths 64/128/256/512."""
    return _create(
        "resnet34_cifar", pretrained, **dict(block=BasicBlock, num_blocks=(3, 4, 6, 3), **kwargs)
    )


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNetV2:
    """CIFAR ResNet-50 (CRD ``ResNet50``, mdistiller ``ResNet50_vanilla``): Bottlenecks 3/4/6/3,
    outputs 256/512/1024/2048. Named ``_cifar`` because timm's ``resnet50`` is the ImageNet net."""
    return _create(
        "resnet50_cifar", pretrained, **dict(block=Bottleneck, num_blocks=(3, 4, 6, 3), **kwargs)
    )
