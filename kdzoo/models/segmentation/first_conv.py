"""Widening a network's first convolution for extra input channels, with LAD's initialisation.

Qiu et al., "Make a Strong Teacher with Label Assistance: A Novel Knowledge Distillation Approach
for Semantic Segmentation", ECCV 2024, arXiv:2407.13254; official code
github.com/skyshoumeng/Label_Assisted_Distillation. LAD concatenates an encoded label map to the
image as a 4th input channel. Its stem conv is widened to 4 input channels, the RGB slice keeps
the existing (ImageNet) filters and only the new slice is drawn from N(0, 0.1^2).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdzoo.errors import ConfigError

__all__ = ["widen_first_conv"]


def widen_first_conv(
    module: nn.Module,
    extra: int,
    *,
    std: float = 0.1,
    generator: torch.Generator | None = None,
) -> nn.Conv2d:
    """Give the first ``nn.Conv2d`` of ``module`` ``extra`` more input channels, in place.

    The first conv in ``module.modules()`` order (the stem of every timm CNN) is replaced in its
    parent module by a copy with ``in_channels + extra`` input channels and the same kernel,
    stride, padding, dilation, bias and conv class. The existing weight is copied exactly into
    ``weight[:, :in_channels]``; only the new slice ``weight[:, in_channels:]`` is initialised,
    from N(0, std^2), or with zeros when ``std == 0``. So a network fed ``[x; 0]`` computes exactly
    what it computed on ``x`` before the call (spec oracle L1), and the new slice's gradient is 0
    until the extra channels carry signal.

    This is LAD's initialisation (std 0.1 in the official code). It is *not* what
    ``timm.create_model(..., in_chans=4, pretrained=True)`` does: timm repeats the RGB filters
    cyclically over the new channels and rescales all of them by 3/4, which changes the RGB
    filters and breaks the ``[x; 0]`` equivalence.

    A weight-standardising conv (e.g. timm's ``StdConv2d``) normalises over all input channels,
    new slice included, so for such stems the equivalence above holds only with ``std == 0``.

    Args:
        module: the network (e.g. a timm ``features_only`` model); modified in place.
        extra: number of input channels to add, ``>= 1``.
        std: standard deviation of the new slice's initialisation, ``>= 0``.
        generator: random generator for the new slice (on the weight's device), for
            reproducibility without touching the global RNG.

    Returns:
        The new conv, already swapped into ``module``.

    Raises:
        ConfigError: ``extra < 1``, ``std < 0``, no ``nn.Conv2d`` in ``module``, ``module`` is
            itself the conv, or the first conv is grouped (``groups != 1``).
    """
    if extra < 1:
        raise ConfigError(f"extra input channels must be >= 1, got {extra}")
    if std < 0:
        raise ConfigError(f"std of the new first-conv slice must be >= 0, got {std}")
    name, conv = _first_conv(module)
    if conv.groups != 1:
        raise ConfigError(
            f"the first conv {name!r} of {type(module).__name__} has groups={conv.groups}: "
            "widening its input is only defined for groups == 1 (a depthwise or grouped stem "
            "would tie the new channels to output groups); use a backbone with a plain stem conv"
        )
    old = conv.weight
    weight = torch.empty(
        old.shape[0], old.shape[1] + extra, *old.shape[2:], dtype=old.dtype, device=old.device
    )
    with torch.no_grad():
        weight[:, : old.shape[1]] = old
        if std > 0:
            nn.init.normal_(weight[:, old.shape[1] :], mean=0.0, std=std, generator=generator)
        else:
            weight[:, old.shape[1] :] = 0
    # A deep copy keeps the conv's class (Conv2dSame, ...), padding mode, bias and hooks; only the
    # weight and the recorded input width change.
    widened = copy.deepcopy(conv)
    widened.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    widened.in_channels = conv.in_channels + extra
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name), attr, widened)
    return widened


def _first_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """The qualified name and the first ``nn.Conv2d`` of ``module``, in ``modules()`` order."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            if not name:
                raise ConfigError(
                    "widen_first_conv needs a network that contains the conv, not the conv "
                    "itself: there is no parent module to swap the widened conv into"
                )
            return name, child
    raise ConfigError(
        f"{type(module).__name__} has no nn.Conv2d to widen for extra input channels; use a "
        "convolutional backbone (or a ViT whose patch embedding is an nn.Conv2d)"
    )
