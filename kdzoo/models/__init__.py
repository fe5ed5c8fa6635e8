"""timm backbone wrapper, teachers, safe weight loading, and the CIFAR KD-benchmark nets
(registered into timm's registry on import)."""

from kdzoo.models import cifar  # noqa: F401  (registers resnet8x4, wrn_40_2, ... into timm)
from kdzoo.models.backbone import Backbone, BackboneOutput
from kdzoo.models.teacher import Teacher, TeacherSpec, build_teacher
from kdzoo.models.weights import WeightsError, load_backbone_state, safe_torch_load

__all__ = [
    "Backbone",
    "BackboneOutput",
    "Teacher",
    "TeacherSpec",
    "WeightsError",
    "build_teacher",
    "load_backbone_state",
    "safe_torch_load",
]
