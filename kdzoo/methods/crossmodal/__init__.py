"""Cross-modal distillation on paired-modality data: a student that sees one modality learns
from teachers that see both or the other one.

:class:`MSTDistill` is "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation" (ACM MM 2025, arXiv:2507.07015; code github.com/Gray-OREO/MST-Distill), one
Lightning run per stage (``stage: 1|2|3``, chained through ``init_from``);
:class:`PairedSupervised` trains the fusion teacher or a unimodal net (the no-KD baseline) and
:class:`CrossModalKD` is the repo's KD baseline from a frozen fusion or cross-modal teacher.
"""

from kdzoo.methods.crossmodal.base import PairedModule
from kdzoo.methods.crossmodal.gate import GateNet
from kdzoo.methods.crossmodal.kd import CrossModalKD, PairedTeacherSpec
from kdzoo.methods.crossmodal.masknet import MaskNet1d, MaskNet2d, masked_layer
from kdzoo.methods.crossmodal.mst import MSTDistill
from kdzoo.methods.crossmodal.supervised import PairedSupervised

__all__ = [
    "CrossModalKD",
    "GateNet",
    "MSTDistill",
    "MaskNet1d",
    "MaskNet2d",
    "PairedModule",
    "PairedSupervised",
    "PairedTeacherSpec",
    "masked_layer",
]
