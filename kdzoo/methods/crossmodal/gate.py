"""MST-Distill's instance-level router (GateNet).

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015; code github.com/Gray-OREO/MST-Distill, ``KD_methods/MST.py``
(``GateNet``), which this follows: the input is the student's raw logits ``z_S`` (not
softmaxed, not detached), then ``Linear(K -> 2K)`` and ``Linear(2K -> E)`` with no
non-linearity between them (so it is one affine map in effect); the routing probabilities are
``softmax`` of its output. The dense (segmentation) variant of the repo is not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GateNet"]


class GateNet(nn.Module):
    """Expert scores ``(N, E)`` from student logits ``(N, K)``.

    Args:
        num_classes: ``K``.
        num_experts: ``E``.
    """

    def __init__(self, num_classes: int, num_experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_classes, 2 * num_classes)
        self.fc2 = nn.Linear(2 * num_classes, num_experts)

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        # No activation between the layers: the repo's GateNet has none.
        return self.fc2(self.fc1(student_logits))
