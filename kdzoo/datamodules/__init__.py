"""kdzoo's LightningDataModules, one per dataset family.

Image classification (:mod:`~kdzoo.datamodules.base`), paired modalities
(:mod:`~kdzoo.datamodules.paired`), semantic segmentation (:mod:`~kdzoo.datamodules.segmentation`)
and corruption streams (:mod:`~kdzoo.datamodules.corruption_stream`) all derive from
:class:`~kdzoo.datamodules.skeleton.KDZooDataModule`, which resolves the data root (argument,
``$KDZOO_DATA``, known locations), downloads only in ``prepare_data`` when ``download=True``, and
serves the loaders. Each exposes the properties the CLI links to the model (``num_classes``,
``in_chans``, ``mean``, ``std``, ...) before ``setup()``. Errors a user fixes (missing data, bad
arguments, malformed files) are subclasses of :class:`kdzoo.errors.KDZooError`, which the
``kdzoo`` command prints as one line.
"""

from kdzoo.datamodules.base import ImageClassificationDataModule
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
from kdzoo.datamodules.skeleton import DatasetNotFoundError, KDZooDataModule, resolve_root
from kdzoo.errors import DataError

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
    "KDZooDataModule",
    "NYUDepthV2",
    "PairedModalityDataModule",
    "PascalVOC",
    "SegmentationDataModule",
    "resolve_root",
]
