"""LightningDataModules for image classification, one per dataset family.

Each resolves its data root (argument, ``$KDZOO_DATA``, known locations), downloads only in
``prepare_data`` when ``download=True``, and exposes ``num_classes``, ``in_chans``, ``mean``,
``std``, ``image_size`` and ``class_names`` before ``setup()`` so the CLI can link them to the
model. Errors a user fixes (missing data, bad arguments, malformed files) are
subclasses of :class:`kdzoo.errors.KDZooError`, which the ``kdzoo`` command prints as one line.
"""

from kdzoo.datamodules.base import (
    DataError,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    resolve_root,
)
from kdzoo.datamodules.cifar import CIFAR10, CIFAR100
from kdzoo.datamodules.corruption_stream import CorruptionStream
from kdzoo.datamodules.digits import Digits
from kdzoo.datamodules.fashion_mnist import FashionMNIST
from kdzoo.datamodules.image_folder import ImageFolder
from kdzoo.datamodules.paired import (
    AVMNIST,
    FashionMNISTPairs,
    FeaturePairs,
    NYUDepthV2,
    PairedModalityDataModule,
)
from kdzoo.datamodules.segmentation import (
    ADE20K,
    GTA5,
    Cityscapes,
    DomainAdaptation,
    FashionMNISTMosaics,
    PascalVOC,
    SegmentationDataModule,
)

__all__ = [
    "ADE20K",
    "AVMNIST",
    "CIFAR10",
    "CIFAR100",
    "GTA5",
    "Cityscapes",
    "CorruptionStream",
    "DataError",
    "DatasetNotFoundError",
    "Digits",
    "DomainAdaptation",
    "FashionMNIST",
    "FashionMNISTMosaics",
    "FashionMNISTPairs",
    "FeaturePairs",
    "ImageClassificationDataModule",
    "ImageFolder",
    "NYUDepthV2",
    "PairedModalityDataModule",
    "PascalVOC",
    "SegmentationDataModule",
    "resolve_root",
]
