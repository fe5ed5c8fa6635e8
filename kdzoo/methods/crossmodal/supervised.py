"""Supervised training on paired-modality data: the fusion teacher, or a unimodal network.

The repo of "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation" (ACM MM 2025, arXiv:2507.07015; github.com/Gray-OREO/MST-Distill) trains its
baselines' teachers with ``main-T.py`` (the multimodal, intermediate-fusion teacher) and
``main-S.py`` (a unimodal model: the cross-modal teacher, or the no-KD student): cross-entropy,
Adam at lr 1e-4 for 100 epochs, the checkpoint with the lowest val loss kept (``val/loss`` here).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from kdzoo.methods.crossmodal.base import PairedModule

__all__ = ["PairedSupervised"]


class PairedSupervised(PairedModule):
    """Cross-entropy training of the fusion net or of a unimodal net on one modality.

    Its checkpoint is a :class:`~kdzoo.methods.crossmodal.kd.CrossModalKD` teacher (``"fusion"``
    or the modality the student does not see), or the no-KD baseline (the student's modality).

    Args:
        network: ``"fusion"`` (both modalities), ``"m1"`` or ``"m2"`` (that modality only).
        **kwargs: architecture, optimiser and scheduler, see
            :class:`~kdzoo.methods.crossmodal.base.PairedModule`.
    """

    description = "supervised paired-modality training (teachers, baselines)"

    def __init__(self, network: Literal["fusion", "m1", "m2"] = "fusion", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.student_role = network
        self.student = self.build_network(network)
        self.loss_weights = {"ce": 1.0}

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        x_m1, x_m2, target = self.split_batch(batch)
        logits = self.student(*self.inputs(self.student_role, x_m1, x_m2))
        return {"ce": F.cross_entropy(logits.float(), target)}
