"""Semantic-segmentation networks: timm ``features_only`` backbones with light heads (FCN,
DeepLabV3, PSPNet, semantic FPN), an auxiliary FCN head, and LAD's first-conv widening."""

from kdzoo.models.segmentation.first_conv import widen_first_conv
from kdzoo.models.segmentation.heads import HEADS
from kdzoo.models.segmentation.model import SegmentationModel, SegmentationOutput

__all__ = ["HEADS", "SegmentationModel", "SegmentationOutput", "widen_first_conv"]
