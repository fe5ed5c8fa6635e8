"""Supervised semantic segmentation: trains a segmentation teacher, or the no-distillation
baseline student (and the "supervised only" row of the semi-supervised and domain-adaptation
comparisons).

The loss is the per-pixel cross-entropy of the main head plus ``aux_weight`` times that of the
auxiliary FCN head, both upsampled to the label size, ignore index 255 (the CIRKD/mmseg recipe).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdzoo.errors import ConfigError
from kdzoo.methods.segmentation.base import SegmentationModule

__all__ = ["SegSupervised"]


class SegSupervised(SegmentationModule):
    """Cross-entropy training of a segmentation network (``ce + aux_weight * aux``).

    Args:
        **kwargs: see :class:`~kdzoo.methods.segmentation.base.SegmentationModule`.
    """

    description = "supervised segmentation (teachers, baselines)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_weights = {"ce": 1.0, "aux": self.hparams.aux_weight}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, masks = labelled_batch(batch, type(self).__name__)
        return self.supervised_terms(images, masks)["terms"]


def labelled_batch(batch: Any, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, masks)`` of a supervised batch; a semi-supervised batch is refused, since the
    method would silently ignore its unlabelled part."""
    if isinstance(batch, Mapping):
        raise ConfigError(
            f"{method} trains on labelled data only, but the datamodule also serves unlabelled "
            "data: set --data.init_args.unlabelled to false/none (or use --model FST)"
        )
    return batch[0], batch[1]
