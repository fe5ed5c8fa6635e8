"""Plain supervised training: trains a teacher, or the no-distillation baseline student.

Cross-entropy with optional label smoothing (Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016, arXiv:1512.00567).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.methods.base import ClassificationModule

__all__ = ["Supervised"]


class Supervised(ClassificationModule):
    """Cross-entropy training of ``student`` (a teacher is just a student trained this way).

    Args:
        label_smoothing: mass moved uniformly over the classes, in ``[0, 1)``.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    def __init__(self, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.loss_weights = {"ce": 1.0}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        logits = self.student(images).logits
        ce = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        return {"ce": ce}
