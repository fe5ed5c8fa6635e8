"""A segmentation network: timm ``features_only`` backbone + light head + optional aux FCN head.

One model contract for the segmentation methods (spec §4.4): ``forward`` returns the head's
logits at feature resolution (1/output_stride, or 1/4 for FPN) *without* upsampling, the
auxiliary head's logits on the second-to-last stage, and the last backbone map, so
channel-wise distillation runs on 1/8 logits as in LAD/CIRKD and the loss/metric code decides
how to upsample. LAD's label-assisted teacher (Qiu et al., ECCV 2024, arXiv:2407.13254) is the
same network with ``extra_in_chans=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.segmentation.first_conv import widen_first_conv
from kdzoo.models.segmentation.heads import HEADS, FCNHead, build_head

__all__ = ["SegmentationModel", "SegmentationOutput"]

OUTPUT_STRIDES = (None, 8, 16, 32)


@dataclass
class SegmentationOutput:
    """What one forward pass of a :class:`SegmentationModel` returns.

    Attributes:
        logits: ``(N, num_classes, h, w)`` at the head's output resolution (1/output_stride for
            ``fcn``/``deeplabv3``/``psp``, 1/4 for ``fpn``); not upsampled.
        aux: ``(N, num_classes, h', w')`` logits of the auxiliary FCN head on the second-to-last
            backbone stage, or ``None`` without an aux head.
        features: ``(N, C_last, h, w)`` last backbone stage map.
    """

    logits: torch.Tensor
    aux: torch.Tensor | None
    features: torch.Tensor


class SegmentationModel(nn.Module):
    """timm backbone (``features_only``, dilated to ``output_stride``) with a segmentation head.

    Args:
        backbone: any timm model name that supports ``features_only`` (and ``output_stride`` when
            it is not ``None``), e.g. ``"resnet18d"``, ``"resnet101s"``, ``"convnext_tiny"``.
        num_classes: output classes.
        head: one of :data:`HEADS`: ``"fcn"``, ``"deeplabv3"``, ``"psp"``, ``"fpn"``.
        in_chans: image channels the backbone is built (and pretrained) for.
        extra_in_chans: extra input channels appended after the image ones (LAD's label channel).
            The backbone's first conv is widened with :func:`widen_first_conv`: pretrained image
            filters kept exactly, new slice from N(0, ``extra_init_std``^2).
        output_stride: 8 or 16 (dilated backbone, as DeepLabV3/PSPNet), 32, or ``None`` for the
            backbone's native stride.
        aux_head: add the auxiliary FCN head (3x3 conv to C/4, BN-ReLU, dropout, classifier) on
            the second-to-last stage, as CIRKD/LAD (weight 0.4 in their losses).
        head_channels: hidden width of the head; default 128 when the last stage has <= 512
            channels (ResNet-18/34, as LAD's R18 heads), else 256 (ResNet-50/101, as CIRKD).
        dropout: ``Dropout2d`` probability before the classifiers (and after ASPP's projection).
        pretrained: load timm's pretrained backbone weights (needs the weights cached or network).
        backbone_kwargs: extra ``timm.create_model`` keyword arguments (``drop_path_rate``, ...).
        extra_init_std: std of the widened first conv's new slice (LAD: 0.1; 0 gives zeros).

    Attributes:
        in_chans: channels :meth:`forward` expects (``in_chans + extra_in_chans``).
        output_stride: stride of the last backbone stage (the argument, or the native stride when
            it is ``None``).
        logits_stride: stride of :attr:`SegmentationOutput.logits` (``output_stride``, or the
            finest FPN level's stride for ``fpn``).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        head: str = "deeplabv3",
        *,
        in_chans: int = 3,
        extra_in_chans: int = 0,
        output_stride: int | None = 8,
        aux_head: bool = True,
        head_channels: int | None = None,
        dropout: float = 0.1,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        extra_init_std: float = 0.1,
    ) -> None:
        super().__init__()
        _check_args(
            num_classes, head, in_chans, extra_in_chans, output_stride, head_channels, dropout
        )
        self.backbone = _create_backbone(
            backbone, in_chans, output_stride, pretrained, backbone_kwargs or {}
        )
        if extra_in_chans > 0:
            widen_first_conv(self.backbone, extra_in_chans, std=extra_init_std)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        if aux_head and len(channels) < 2:
            raise ConfigError(
                f"backbone {backbone!r} has a single feature stage: the aux head needs a "
                "second-to-last stage; set aux_head=False"
            )
        if head_channels is None:
            head_channels = 128 if channels[-1] <= 512 else 256
        self.num_classes = num_classes
        self.in_chans = in_chans + extra_in_chans
        self.extra_in_chans = extra_in_chans
        self.output_stride = reductions[-1]
        self.head = build_head(head, channels, reductions, num_classes, head_channels, dropout)
        self.logits_stride = reductions[self.head.in_index[0] if head == "fpn" else -1]
        self.aux_head = None
        if aux_head:  # CIRKD/LAD: one 3x3 conv to C3/4 on the second-to-last stage
            aux_channels = max(1, channels[-2] // 4)
            self.aux_head = FCNHead(
                channels[-2], aux_channels, num_classes, dropout, num_convs=1, in_index=-2
            )

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        """Run backbone and heads on ``(N, in_chans, H, W)`` inputs (any H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            extra = f" ({self.extra_in_chans} of them extra)" if self.extra_in_chans else ""
            raise ValueError(
                f"expected (N, {self.in_chans}, H, W) inputs{extra}, got {tuple(x.shape)}: "
                "match in_chans / extra_in_chans to the data (a LAD student feeds a zero channel)"
            )
        features = self.backbone(x)
        aux = self.aux_head(features) if self.aux_head is not None else None
        return SegmentationOutput(logits=self.head(features), aux=aux, features=features[-1])

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the head and the aux head (for a head learning-rate multiplier)."""
        params = list(self.head.parameters())
        if self.aux_head is not None:
            params += list(self.aux_head.parameters())
        return params

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone (widened first conv included)."""
        return list(self.backbone.parameters())


def _check_args(
    num_classes: int,
    head: str,
    in_chans: int,
    extra_in_chans: int,
    output_stride: int | None,
    head_channels: int | None,
    dropout: float,
) -> None:
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if head not in HEADS:
        raise ConfigError(f"unknown segmentation head {head!r}; choose one of {', '.join(HEADS)}")
    if in_chans < 1 or extra_in_chans < 0:
        raise ConfigError(
            f"in_chans must be >= 1 and extra_in_chans >= 0, got {in_chans} and {extra_in_chans}"
        )
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output_stride must be None, 8, 16 or 32, got {output_stride!r} (8 or 16 for "
            "dilated DeepLabV3/PSPNet backbones, None for the backbone's native stride)"
        )
    if head_channels is not None and head_channels < 1:
        raise ConfigError(f"head_channels must be >= 1 or None, got {head_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")


def _create_backbone(
    name: str,
    in_chans: int,
    output_stride: int | None,
    pretrained: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` with errors a user can act on."""
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm backbone {name!r}: see `timm.list_models('{name.split('.')[0][:4]}*')` "
            "for names that exist"
        )
    if output_stride is not None:
        kwargs = {**kwargs, "output_stride": output_stride}
    try:
        model = timm.create_model(
            name, features_only=True, pretrained=pretrained, in_chans=in_chans, **kwargs
        )
    except (TypeError, RuntimeError, ValueError, AssertionError) as error:
        stride_hint = (
            f" or output_stride={output_stride} (try output_stride=None, or a CNN such as "
            "resnet18d / convnext_tiny)"
            if output_stride is not None
            else " (try a CNN such as resnet18d / convnext_tiny)"
        )
        raise ConfigError(
            f"timm backbone {name!r} could not be built with features_only=True{stride_hint}: "
            f"{error}"
        ) from error
    reductions = model.feature_info.reduction()
    if output_stride is not None and reductions[-1] != output_stride:
        raise ConfigError(
            f"timm backbone {name!r} ignores output_stride={output_stride} (its last stage has "
            f"stride {reductions[-1]}); use output_stride=None or a backbone that supports "
            "dilation"
        )
    return model
