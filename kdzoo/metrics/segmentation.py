"""Semantic-segmentation metrics over an accumulated confusion matrix: mIoU and pixel accuracy.

mIoU follows mmsegmentation's ``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): per-class
IoU = TP / (TP + FP + FN) from a confusion matrix summed over the whole split, ignore pixels
dropped, and the mean taken over classes that occur in the target or the prediction (``nanmean``;
a class absent from both has an undefined IoU and is left out rather than counted as 0 or 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from kdzoo.errors import ConfigError

__all__ = ["MeanIoU", "PixelAccuracy"]

_MAX_IDS_SHOWN = 10


class _ConfusionMatrixMetric(Metric):
    """Accumulates a ``(C, C)`` int64 confusion matrix (rows: target, columns: prediction).

    The state is summed across processes (``dist_reduce_fx="sum"``), so the metric is exact
    under DDP: the global confusion matrix is the sum of the per-process ones.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    confmat: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index {ignore_index} is a class id (0..{num_classes - 1}); use a value "
                "outside the classes, e.g. 255"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            preds: ``(N, H, W)`` predicted class ids, or ``(N, C, H, W)`` logits/probabilities
                (argmax over ``C``).
            target: ``(N, H, W)`` class ids ``0..C-1`` or ``ignore_index``, at the same spatial
                size as ``preds`` (upsample the logits to the label size first).
        """
        preds = self._class_ids(preds)
        if target.is_floating_point() or target.shape != preds.shape:
            raise _data_error(
                f"target must be an integer (N, H, W) mask of the predictions' shape "
                f"{tuple(preds.shape)}, got {target.dtype} of shape {tuple(target.shape)}: "
                "upsample the logits to the label size before the metric"
            )
        valid = target != self.ignore_index
        target, preds = target[valid].long(), preds[valid].long()
        self._check_ids(target, preds)
        index = target * self.num_classes + preds
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.confmat += counts.reshape(self.num_classes, self.num_classes)

    def _class_ids(self, preds: torch.Tensor) -> torch.Tensor:
        if preds.ndim == 4:
            if preds.shape[1] != self.num_classes:
                raise _data_error(
                    f"logits {tuple(preds.shape)} have {preds.shape[1]} channels, expected "
                    f"num_classes = {self.num_classes}"
                )
            return preds.argmax(dim=1)
        if preds.ndim != 3 or preds.is_floating_point():
            raise _data_error(
                "preds must be (N, H, W) integer class ids or (N, C, H, W) logits, got "
                f"{preds.dtype} of shape {tuple(preds.shape)}"
            )
        return preds

    def _check_ids(self, target: torch.Tensor, preds: torch.Tensor) -> None:
        if not self._out_of_range(target) and not self._out_of_range(preds):
            return  # the common case: one min/max each, no boolean indexing
        bad = target[(target < 0) | (target >= self.num_classes)].unique()
        if bad.numel():
            raise _data_error(
                f"target holds ids {_show(bad)} outside the classes 0..{self.num_classes - 1} and "
                f"ignore_index {self.ignore_index}: masks must hold class ids 0..C-1 and "
                "ignore_index (e.g. convert Cityscapes labelIds to trainIds, use "
                "reduce_zero_label for ADE20K, read VOC palette PNGs as indices)"
            )
        bad = preds[(preds < 0) | (preds >= self.num_classes)].unique()
        if bad.numel():
            raise _data_error(
                f"preds hold class ids {_show(bad)} outside 0..{self.num_classes - 1}: does the "
                f"model predict num_classes = {self.num_classes} classes?"
            )

    def _out_of_range(self, ids: torch.Tensor) -> bool:
        if ids.numel() == 0:
            return False
        low, high = torch.aminmax(ids)
        return bool(low < 0) or bool(high >= self.num_classes)


def _data_error(message: str) -> ValueError:
    """A :class:`kdzoo.datamodules.base.DataError` (a ``ValueError``), imported only when raised
    so that importing the metrics does not pull in the datamodules' dependencies."""
    from kdzoo.datamodules.base import DataError

    return DataError(message)


def _show(ids: torch.Tensor) -> str:
    shown = ids[:_MAX_IDS_SHOWN].tolist()
    more = f" (and {ids.numel() - _MAX_IDS_SHOWN} more)" if ids.numel() > _MAX_IDS_SHOWN else ""
    return f"{shown}{more}"


class MeanIoU(_ConfusionMatrixMetric):
    """Mean intersection-over-union over the classes present in the target or the prediction.

    Args:
        num_classes: number of classes ``C``; target ids are ``0..C-1`` or ``ignore_index``.
        ignore_index: label of pixels that are not counted (255 in every dataset kdzoo reads).
        **kwargs: :class:`torchmetrics.Metric` options (``sync_on_compute``, ...).
    """

    def per_class(self) -> torch.Tensor:
        """``(C,)`` float IoU per class; NaN where the class is in neither target nor prediction.

        Synchronised across processes like :meth:`compute`.
        """
        with self.sync_context(should_sync=self._to_sync):
            return _iou(self.confmat)

    def compute(self) -> torch.Tensor:
        """mIoU in [0, 1]: the mean of :meth:`per_class` over classes with a non-empty union
        (NaN when no pixel was counted)."""
        return torch.nanmean(_iou(self.confmat))


class PixelAccuracy(_ConfusionMatrixMetric):
    """Correctly classified pixels / valid pixels (``ignore_index`` pixels excluded).

    Args:
        num_classes: number of classes ``C``.
        ignore_index: label of pixels that are not counted.
        **kwargs: :class:`torchmetrics.Metric` options.
    """

    def compute(self) -> torch.Tensor:
        """Pixel accuracy in [0, 1] (NaN when no pixel was counted)."""
        total = self.confmat.sum()
        return (self.confmat.diagonal().sum().double() / total).float()


def _iou(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class TP / (TP + FP + FN) in float64 (exact counts), returned as float32."""
    confmat = confmat.double()
    tp = confmat.diagonal()
    union = confmat.sum(dim=0) + confmat.sum(dim=1) - tp
    return (tp / union).float()  # 0 / 0 -> NaN for classes absent from both
