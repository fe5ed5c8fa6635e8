"""timm plumbing shared by the CIFAR KD-benchmark nets: pretrained cfg, classifier head, stages.

Each network subclasses :class:`CifarNet`, builds its layers under the attribute names of the CRD
code (so CRD / mdistiller checkpoints load without renaming keys) and implements
:meth:`CifarNet.forward_stage`; this class turns that into timm's interface: ``feature_info``,
``forward_features``, ``forward_intermediates``, ``forward_head``, ``get_classifier``,
``reset_classifier``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CifarNet", "build_cifar_model", "cifar_cfg"]

# Per-channel statistics of the CIFAR-100 training set, the normalisation CRD trains with.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg for a CIFAR-100 net. No ``url``/``hf_hub_id``: no weights are
    published, so ``pretrained=True`` raises timm's "No pretrained weights exist" error unless
    ``pretrained_cfg_overlay=dict(file=...)`` points at a checkpoint (e.g. a CRD teacher)."""
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


def build_cifar_model(
    model_cls: type[CifarNet], variant: str, pretrained: bool, num_stages: int, **kwargs: Any
) -> CifarNet:
    """``build_model_with_cfg`` with ``features_only=True`` served by ``forward_intermediates``
    (timm's ``'getter'`` feature class), whose default ``out_indices`` are all the stages."""
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_stages))),
        **kwargs,
    )


class CifarNet(nn.Module):
    """Base class: a stem and stages, then an optional head block, global pool and classifier.

    Subclasses set ``feature_info`` (one dict per stage, the stem being stage 0) and
    ``num_features`` (channels of ``forward_features``), build their layers, then call
    :meth:`_init_head`. They implement :meth:`forward_stage` and, when the net has layers between
    the last stage and the pooling (a final BN-ReLU or a 1x1 conv head), :meth:`forward_final`.

    Class attributes:
        classifier_name: attribute holding the classifier (CRD's name: ``fc``, ``classifier``,
            ``linear``), kept so that CRD checkpoints load unchanged.
        final_is_norm: :meth:`forward_final` is a norm (pre-activation nets), so
            ``forward_intermediates(norm=True)`` applies it to the last stage's map.
    """

    classifier_name = "fc"
    final_is_norm = False

    num_classes: int
    num_features: int
    feature_info: list[dict[str, Any]]

    def _init_head(self, num_classes: int, drop_rate: float, global_pool: str) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = _make_pool(global_pool)
        setattr(self, self.classifier_name, self._make_classifier(self.num_features, num_classes))

    def _make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``index`` (0 = stem) on the output of the previous one."""
        raise NotImplementedError

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """Layers between the last stage and the global pool (none by default)."""
        return x

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return self.classifier_name if name_only else getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _make_pool(global_pool)
        device = next(self.parameters()).device
        head = self._make_classifier(self.num_features, num_classes).to(device)
        setattr(self, self.classifier_name, head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(len(self.feature_info)):
            x = self.forward_stage(index, x)
        return self.forward_final(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features that also returns the stage outputs, as timm's models do.

        Args:
            x: ``(N, C, H, W)`` images.
            indices: stages to return: the last n if int, all if None, else a list of indices
                (negative from the end); stage 0 is the stem.
            norm: apply the final norm to the last stage's map (pre-activation nets only).
            stop_early: stop after the deepest requested stage (the first return value is then
                that stage's output, as in timm).
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the list of maps.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        num_stages = len(self.feature_info)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early or intermediates_only else num_stages - 1
        intermediates = []
        for index in range(last + 1):
            x = self.forward_stage(index, x)
            if index in take_indices:
                use_norm = norm and self.final_is_norm and index == num_stages - 1
                intermediates.append(self.forward_final(x) if use_norm else x)
        if intermediates_only:
            return intermediates
        if last == num_stages - 1:
            x = self.forward_final(x)
        return x, intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make_pool(pool_type: str) -> SelectAdaptivePool2d:
    # CRD pools with a fixed AvgPool2d(8) / avg_pool2d(4) sized for 32x32 inputs; a global pool is
    # the same there and also works at other input sizes.
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
