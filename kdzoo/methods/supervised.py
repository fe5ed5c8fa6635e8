"""Plain supervised training: trains a teacher, or the no-distillation baseline student.

``loss="softmax"``: cross-entropy with optional label smoothing (Szegedy et al., "Rethinking the
Inception Architecture for Computer Vision", CVPR 2016, arXiv:1512.00567).
``loss="sigmoid"``: per-class binary cross-entropy against the one-hot label, the teacher
(specialist) loss of Knowledge Concentration (Gao, Guo, Li, Nevatia, "Knowledge Concentration:
Learning 100K Object Classifiers in a Single CNN", arXiv:1711.07607, 2017; no official code).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.methods.base import ClassificationModule
from kdzoo.validation import check_fraction

__all__ = ["Supervised"]


class Supervised(ClassificationModule):
    r"""Cross-entropy training of ``student`` (a teacher is just a student trained this way).

    Args:
        label_smoothing: mass moved uniformly over the classes, in ``[0, 1)`` (softmax only).
        loss: ``"softmax"``: cross-entropy over the classes, loss term ``"ce"``. ``"sigmoid"``:
            one independent binary cross-entropy per class against the one-hot label, summed
            over classes and averaged over the batch, loss term ``"bce"``:
            :math:`-\frac{1}{N}\sum_i \sum_j [z_{ij} \log \sigma(x_{ij})
            + (1 - z_{ij}) \log(1 - \sigma(x_{ij}))]` (the specialists of
            :class:`~kdzoo.methods.kc.KnowledgeConcentration`). Evaluation does not change:
            accuracy ranks the logits, the same under softmax and sigmoid, and ``val/loss``
            stays the softmax cross-entropy.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    description = "cross-entropy training (teachers, baselines)"

    def __init__(
        self,
        label_smoothing: float = 0.0,
        loss: Literal["softmax", "sigmoid"] = "softmax",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fraction(label_smoothing=label_smoothing, below_one=True)
        if loss == "sigmoid" and label_smoothing:
            raise ConfigError(
                f"label_smoothing={label_smoothing} is only implemented for loss='softmax': "
                "remove label_smoothing or use loss='softmax'"
            )
        self.label_smoothing = label_smoothing
        self.loss = loss
        self.loss_weights = {"ce": 1.0} if loss == "softmax" else {"bce": 1.0}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        logits = self.student(images).logits.float()
        if self.loss == "sigmoid":
            one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
            return {"bce": bce.sum(dim=1).mean()}
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return {"ce": ce}
