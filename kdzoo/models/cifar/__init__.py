"""The CIFAR knowledge-distillation benchmark nets, registered into timm's model registry.

Importing this package registers the architectures of the CRD benchmark (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699; official code
HobbitLong/RepDistiller, reused by megvii-research/mdistiller for DKD, CVPR 2022,
arXiv:2203.08679), so that ``timm.create_model('resnet8x4', num_classes=100)`` works like any timm
model: ``forward_features``, ``forward_intermediates``, ``forward_head(pre_logits=...)``,
``feature_info``, ``get_classifier``/``reset_classifier``, ``features_only=True``.

Registered names (the papers' names where timm does not already use them):

=====================  ===================  ==========================================
timm name              CRD / mdistiller     notes
=====================  ===================  ==========================================
``resnet8``            ``resnet8``          also ``resnet14/20/32/44/56/110``
``resnet8x4``          ``resnet8x4``        widths 32/64/128/256
``resnet32x4``         ``resnet32x4``       widths 32/64/128/256
``resnet50_cifar``     ``ResNet50``         ImageNet widths, Bottleneck; also
                                            ``resnet18_cifar``, ``resnet34_cifar``
                                            (timm has ``resnet18``..``resnet50``)
``wrn_16_1``           ``wrn_16_1``         also ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``
``vgg8``               ``vgg8`` (vgg8_bn)   BN variant, as in the tables
``vgg11_cifar``        ``vgg11`` (_bn)      also ``vgg13_cifar``, ``vgg16_cifar``,
                                            ``vgg19_cifar`` (timm has ``vgg11``..``vgg19``)
``mobilenetv2_cifar``  ``MobileNetV2``      CRD ``mobile_half``: T = 6, width 0.5
``shufflenetv1_cifar`` ``ShuffleV1``
``shufflenetv2_cifar`` ``ShuffleV2``
=====================  ===================  ==========================================

All take ``num_classes`` (default 100), ``in_chans``, ``drop_rate`` (dropout before the
classifier) and ``global_pool``; their pretrained cfg holds CIFAR-100's mean/std and a 32x32 input
size but no weights (``pretrained=True`` raises; ``pretrained_cfg_overlay=dict(file=...)`` loads
a checkpoint, and CRD's own teacher checkpoints have matching state-dict keys). Stage 0 of
``feature_info`` is the stem. :data:`CIFAR_MODELS` lists every registered name.
"""

from __future__ import annotations

import timm

from kdzoo.models.cifar import (
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_resnetv2,
    cifar_shufflenet,
    cifar_vgg,
    cifar_wrn,
)
from kdzoo.models.cifar._base import CIFAR100_MEAN, CIFAR100_STD, CifarNet

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_MODELS", "CifarNet"]

# timm groups models by the last component of their module name, hence the `cifar_` prefixes:
# `timm.list_models(module='cifar_resnet')` does not mix with timm's own `resnet` module.
_MODULES = (cifar_resnet, cifar_resnetv2, cifar_wrn, cifar_vgg, cifar_mobilenetv2, cifar_shufflenet)
CIFAR_MODELS: tuple[str, ...] = tuple(
    timm.list_models(module=[m.__name__.rsplit(".", 1)[-1] for m in _MODULES])
)
