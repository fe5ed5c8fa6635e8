"""LightningDataModules of paired modalities for cross-modal distillation.

Batches are ``(x_m1, x_m2, y)`` (contract in :mod:`kdzoo.datamodules.paired.base`), the data of
MST-Distill (Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025, arXiv:2507.07015; https://github.com/Gray-OREO/MST-Distill):
:class:`AVMNIST` (image/audio), :class:`NYUDepthV2` (RGB/depth segmentation),
:class:`FeaturePairs` (pre-extracted features such as CrisisMMD's image/text), and a generated
offline benchmark, :class:`FashionMNISTPairs` (occluded camera/coarse shape sensor).
"""

from kdzoo.datamodules.paired.avmnist import AVMNIST
from kdzoo.datamodules.paired.base import (
    MissingDataFileError,
    PairedDataset,
    PairedModalityDataModule,
)
from kdzoo.datamodules.paired.fashion_pairs import FashionMNISTPairs
from kdzoo.datamodules.paired.features import FeaturePairs
from kdzoo.datamodules.paired.nyu_depth import NYUDepthV2

__all__ = [
    "AVMNIST",
    "FashionMNISTPairs",
    "FeaturePairs",
    "MissingDataFileError",
    "NYUDepthV2",
    "PairedDataset",
    "PairedModalityDataModule",
]
