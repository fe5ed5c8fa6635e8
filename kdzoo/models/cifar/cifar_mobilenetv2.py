"""MobileNetV2 of the CRD / mdistiller KD benchmark: ``mobilenetv2_cifar`` (CRD ``mobile_half``,
the tables' "MobileNetV2").

Paper: Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018, arXiv:1801.04381. Benchmark: Tian, Krishnan, Isola, "Contrastive
Representation Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/mobilenetv2.py`` (commit
b13aecc, read from a stored copy; mdistiller's ``mdistiller/models/cifar/mobilenetv2.py`` is the
same net), none of it copied. ``mobile_half`` is expansion T = 6 and width 0.5, with CIFAR strides:
a 3x3 stride-2 conv-BN-ReLU stem (16 channels), the seven inverted-residual groups (t, c, n, s) =
(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
(6, 320, 1, 1) with c scaled by 0.5 and truncated (8, 12, 16, 32, 48, 80, 160), a 1x1
conv-BN-ReLU to 1280 channels (not scaled for width <= 1), global average pool, linear. Unlike
torchvision's, every block (also t = 1) has the 1x1 expansion conv, and the second group keeps
stride 1. Attribute names follow CRD (``conv1``, ``blocks.<g>.<j>.conv``, ``conv2``,
``classifier.0``) so CRD checkpoints load as they are.

Stages (CRD's feature taps f0..f4): the stem (stride 2), groups 0-1 (stride 2), group 2 (4),
groups 3-4 (8), groups 5-6 (16). The 1x1 conv to 1280 belongs to ``forward_features`` (as
timm's ``conv_head`` in its MobileNetV2), so ``num_features`` is 1280 and the last stage map has
160 channels.

Name: timm's ``mobilenetv2_050`` is the ImageNet net, hence ``mobilenetv2_cifar``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarMobileNetV2", "InvertedResidual"]

# (expansion t, channels c, repeats n, first stride s) of each group, before width scaling.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_SETTING += ((6, 160, 3, 2), (6, 320, 1, 1))
# Groups that make up stages 1..4 (stage 0 is the stem).
_STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


def _conv_bn_relu(in_chs: int, out_chs: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN; identity shortcut when the
    shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = in_chs * expand_ratio
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """CRD's CIFAR MobileNetV2.

    Args:
        expand_ratio: T, the expansion of all groups but the first.
        width_mult: channel multiplier (0.5 for ``mobile_half``).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
    """

    classifier_name = "classifier"

    def __init__(
        self,
        expand_ratio: int = 6,
        width_mult: float = 0.5,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        in_chs = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, in_chs, 3, 2)
        self.blocks = nn.ModuleList()
        reductions = [2]
        for t, c, n, s in _SETTING:
            out_chs = int(c * width_mult)
            t = t if t == 1 else expand_ratio
            group = []
            for stride in [s] + [1] * (n - 1):
                group.append(InvertedResidual(in_chs, out_chs, stride, t))
                in_chs = out_chs
            self.blocks.append(nn.Sequential(*group))
            reductions.append(reductions[-1] * s)
        self.feature_info = [dict(num_chs=int(32 * width_mult), reduction=2, module="conv1")]
        for groups in _STAGE_GROUPS:
            last = groups[-1]
            self.feature_info.append(
                dict(
                    num_chs=int(_SETTING[last][1] * width_mult),
                    reduction=reductions[last + 1],
                    module=f"blocks.{last}",
                )
            )
        # CRD: int(1280 * width_mult) only for width_mult > 1.
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_chs, self.num_features, 1, 1)
        self._init_head(num_classes, drop_rate, global_pool)

        # CRD's initialisation: He-normal (fan-out) convs, unit BN, N(0, 0.01) linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        # CRD wraps the linear layer in a Sequential: its checkpoints hold `classifier.0.*`.
        if num_classes <= 0:
            return nn.Identity()
        return nn.Sequential(nn.Linear(num_features, num_classes))

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.conv1(x)
        for group in _STAGE_GROUPS[index - 1]:
            x = self.blocks[group](x)
        return x

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)


default_cfgs = generate_default_cfgs(
    {
        "mobilenetv2_cifar": cifar_cfg(
            pool_size=(2, 2), first_conv="conv1.0", classifier="classifier.0"
        )
    }
)


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """CIFAR MobileNetV2, T = 6, width 0.5 (CRD ``mobile_half``, the tables' "MobileNetV2")."""
    model_args = dict(expand_ratio=6, width_mult=0.5)
    return build_cifar_model(
        CifarMobileNetV2,
        "mobilenetv2_cifar",
        pretrained,
        num_stages=5,
        **dict(model_args, **kwargs),
    )
