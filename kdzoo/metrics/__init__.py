"""torchmetrics metrics that torchmetrics lacks or defines differently from the papers kdzoo
reproduces (segmentation mIoU with mmsegmentation's conventions)."""

from kdzoo.metrics.segmentation import MeanIoU, PixelAccuracy

__all__ = ["MeanIoU", "PixelAccuracy"]
