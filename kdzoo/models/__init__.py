"""timm backbone wrapper, teachers and safe weight loading."""

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
