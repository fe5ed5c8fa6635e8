"""VGGs of the CRD / mdistiller KD benchmark: ``vgg8``, ``vgg11_cifar``, ``vgg13_cifar``,
``vgg16_cifar``, ``vgg19_cifar``.

Paper: Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, arXiv:1409.1556. Benchmark: Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020, arXiv:1910.10699.
Checked against the official code, HobbitLong/RepDistiller ``models/vgg.py`` (commit eedab9d,
read from a stored copy; mdistiller reuses it), none of it copied. The benchmark tables' "VGG8",
"VGG13", ... are CRD's ``vgg8_bn``, ``vgg13_bn``, ... (its ``model_dict`` maps ``'vgg13'`` to
``vgg13_bn``), so the batch-norm variants are what is registered here. Five blocks of 3x3
conv(bias)-BN-ReLU layers (widths of VGG configs S/A/B/D/E, 64 to 512), max-pool 2x2 after the
first three blocks, no FC stack: global average pool, then one linear layer (512 -> classes).
Attribute names follow CRD (``block0``..``block4`` as ``Sequential(conv, bn, relu, conv, bn)``,
``classifier``) so CRD checkpoints load as they are.

Names: timm already registers ``vgg11``..``vgg19`` (ImageNet VGGs), so those four carry a
``_cifar`` suffix; ``vgg8`` is free and keeps the papers' name.

Difference from CRD: CRD max-pools after the fourth block too when the input is 64 pixels high
(its Tiny-ImageNet path); for CIFAR's 32x32 inputs it never does, and neither does this model at
any size, so the last two stages are always at stride 8 as ``feature_info`` says.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from kdzoo.models.cifar._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarVGG"]

# Widths of the convs in each of the five blocks (CRD's cfg 'S', 'A', 'B', 'D', 'E').
_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}
_NUM_POOLED = 3  # blocks 1..3 start with a 2x2 max-pool; block 4 does not at 32x32


def _make_block(widths: tuple[int, ...], in_chs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_chs, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(True)]
        in_chs = width
    # The block's last ReLU is applied in forward (CRD keeps the pre-ReLU map for some methods).
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarNet):
    """CRD's VGG with batch norm for 32x32 inputs.

    Args:
        cfg: conv widths of the five blocks.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier (CRD uses none).
        global_pool: timm pool type for the head.
    """

    classifier_name = "classifier"

    def __init__(
        self,
        cfg: tuple[tuple[int, ...], ...],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.feature_info = []
        in_chs, reduction = in_chans, 1
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _make_block(widths, in_chs))
            in_chs = widths[-1]
            reduction *= 2 if 0 < i <= _NUM_POOLED else 1
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"block{i}"))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.num_features = in_chs
        self._init_head(num_classes, drop_rate, global_pool)

        # CRD's initialisation: He-normal (fan-out) convs, zero biases, unit BN, N(0, 0.01) linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if 0 < index <= _NUM_POOLED:
            x = self.pool(x)
        return F.relu(self.get_submodule(f"block{index}")(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return cifar_cfg(pool_size=(4, 4), first_conv="block0.0", classifier="classifier", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "vgg8": _cfg(),
        "vgg11_cifar": _cfg(),
        "vgg13_cifar": _cfg(),
        "vgg16_cifar": _cfg(),
        "vgg19_cifar": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarVGG:
    cfg = _CFGS[variant.removesuffix("_cifar")]
    return build_cifar_model(CifarVGG, variant, pretrained, num_stages=5, cfg=cfg, **kwargs)


@register_model
def vgg8(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """CIFAR VGG-8 with BN (CRD ``vgg8_bn``, the tables' "VGG8"): one conv per block."""
    return _create("vgg8", pretrained, **kwargs)


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """CIFAR VGG-11 with BN (CRD ``vgg11_bn``, the tables' "VGG11"); timm's ``vgg11`` is
    the ImageNet net."""
    return _create("vgg11_cifar", pretrained, **kwargs)


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """CIFAR VGG-13 with BN (CRD ``vgg13_bn``, the tables' "VGG13"); timm's ``vgg13`` is
    the ImageNet net."""
    return _create("vgg13_cifar", pretrained, **kwargs)


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """CIFAR VGG-16 with BN (CRD ``vgg16_bn``, the tables' "VGG16"); timm's ``vgg16`` is
    the ImageNet net."""
    return _create("vgg16_cifar", pretrained, **kwargs)


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """CIFAR VGG-19 with BN (CRD ``vgg19_bn``, the tables' "VGG19"); timm's ``vgg19`` is
    the ImageNet net."""
    return _create("vgg19_cifar", pretrained, **kwargs)
