"""Semantic segmentation methods: supervised training, label-assisted distillation (LAD) and
learning-from-future self-training (FST), over timm ``features_only`` backbones."""

from kdzoo.methods.segmentation.base import SegmentationModule, SegTeacherSpec
from kdzoo.methods.segmentation.fst import FST
from kdzoo.methods.segmentation.lad import LADTeacher, encode_labels
from kdzoo.methods.segmentation.segkd import SegKD
from kdzoo.methods.segmentation.supervised import SegSupervised

__all__ = [
    "FST",
    "LADTeacher",
    "SegKD",
    "SegSupervised",
    "SegTeacherSpec",
    "SegmentationModule",
    "encode_labels",
]
