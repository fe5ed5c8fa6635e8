"""LightningDataModules for semantic segmentation (kdzoo spec ``segmentation.md`` §5).

Real datasets in the folder layouts mmsegmentation's converters write (:class:`Cityscapes`,
:class:`ADE20K`, :class:`PascalVOC`, :class:`GTA5`; never downloaded) and a generated offline
benchmark (:class:`FashionMNISTMosaics`). All share :class:`SegmentationDataModule`'s contract:
``(image, mask)`` batches with ignore index 255, and ``{"labelled", "unlabelled"[, "future"]}``
dict batches for semi-supervised and domain-adaptation training (:class:`DomainAdaptation`
pairs a labelled source dataset with an unlabelled target one).
"""

from kdzoo.datamodules.segmentation.adaptation import DomainAdaptation
from kdzoo.datamodules.segmentation.ade20k import ADE20K
from kdzoo.datamodules.segmentation.base import IGNORE_INDEX, SegmentationDataModule
from kdzoo.datamodules.segmentation.cityscapes import Cityscapes
from kdzoo.datamodules.segmentation.gta5 import GTA5
from kdzoo.datamodules.segmentation.mosaics import FashionMNISTMosaics
from kdzoo.datamodules.segmentation.voc import PascalVOC

__all__ = [
    "ADE20K",
    "GTA5",
    "IGNORE_INDEX",
    "Cityscapes",
    "DomainAdaptation",
    "FashionMNISTMosaics",
    "PascalVOC",
    "SegmentationDataModule",
]
