"""ImageNet-style folder DataModule: ``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*``.

Splits: the ``train`` folder is split (seeded, ``val_fraction``) into train and val, and the
``val`` folder is the *test* split, since ImageNet-style datasets publish labelled validation
images but no labelled test set, and papers report accuracy on that folder. Images are read lazily
with PIL, so the dataset never has to fit in memory.
"""

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image

from kdzoo.datamodules.base import (
    DataError,
    DatasetNotFoundError,
    ImageClassificationDataModule,
    TransformedDataset,
    Transforms,
)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Greyscale equivalents (channel averages), used when in_chans=1.
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)
# Eval resizes the shorter side to image_size / CROP_PCT, then centre-crops (the usual 0.875).
CROP_PCT = 0.875


class ImageFileDataset(TransformedDataset):
    """Image files with integer labels, decoded on access into uint8 ``H x W x C`` arrays."""

    def __init__(
        self,
        paths: list[Path],
        targets: Any,
        transform: A.Compose,
        indices: Any = None,
        rank: int = 0,
        mode: str = "RGB",
    ) -> None:
        super().__init__(targets, transform, indices, rank)
        self._paths = list(paths)
        self.mode = mode

    @property
    def paths(self) -> list[Path]:
        """Files of the items in this dataset (after split and subset), in item order."""
        return [self._paths[i] for i in self.indices]

    def load_image(self, j: int) -> np.ndarray:
        with Image.open(self._paths[j]) as image:
            pixels = np.asarray(image.convert(self.mode), dtype=np.uint8)
        return pixels[..., None] if pixels.ndim == 2 else pixels


def _class_dirs(directory: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``directory`` (empty if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(directory: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``directory/<class>/`` and their class indices, in a fixed order."""
    paths, targets = [], []
    for index, name in enumerate(classes):
        files = sorted(
            p for p in (directory / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )  # fmt: skip
        paths += files
        targets += [index] * len(files)
    if not paths:
        raise DatasetNotFoundError(f"{directory}: no images with extensions {IMG_EXTENSIONS}")
    return paths, targets


class ImageFolder(ImageClassificationDataModule):
    """ImageNet-style folders: ``root/train/<class>/*`` (split into train and val) and
    ``root/val/<class>/*`` (the test split).

    Train: RandomResizedCrop(image_size, scale=(0.08, 1)) + horizontal flip. Eval: resize the
    shorter side to ``int(image_size / 0.875)``, centre-crop ``image_size``.

    Args:
        in_chans: 3 reads RGB, 1 reads greyscale.
        mean: normalisation mean (default ImageNet's, or its channel average for ``in_chans=1``).
        std: normalisation std (as ``mean``).
        Other arguments: see :class:`ImageClassificationDataModule`.
    """

    name = "ImageFolder dataset"
    data_subdir = "imagenet"
    expected_files = ("train", "val")

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 224,
        grey_to_rgb: bool = False,
        augment: bool = True,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        download: bool = False,
        in_chans: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            split_seed=split_seed,
            image_size=image_size,
            grey_to_rgb=grey_to_rgb,
            augment=augment,
            train_subset=train_subset,
            eval_subset=eval_subset,
            download=download,
        )
        if in_chans not in (1, 3):
            raise DataError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self.native_chans = in_chans
        self.native_mean = tuple(mean or (IMAGENET_MEAN if in_chans == 3 else IMAGENET_GREY_MEAN))
        self.native_std = tuple(std or (IMAGENET_STD if in_chans == 3 else IMAGENET_GREY_STD))
        for arg, values in (("mean", self.native_mean), ("std", self.native_std)):
            if len(values) != in_chans:
                raise DataError(f"{arg} must have in_chans={in_chans} values, got {values!r}")
        if min(self.native_std) <= 0:
            raise DataError(f"std values must be > 0, got {self.native_std!r}")
        self._classes: list[str] | None = None

    def how_to_get(self) -> list[str]:
        return [
            "pass --data.root DIR where DIR/train/<class>/ and DIR/val/<class>/ hold the images "
            "(ImageFolder cannot download)"
        ]

    @property
    def class_names(self) -> list[str]:
        # Read from the folder names on first use, so num_classes is known before setup().
        if self._classes is None:
            classes = _class_dirs(self.find_root() / "train")
            if not classes:
                raise DatasetNotFoundError(f"{self.find_root() / 'train'}: no class subfolders")
            self._classes = classes
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_data(self):
        root = self.find_root()
        classes = self.class_names
        val_classes = _class_dirs(root / "val")
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            raise DataError(
                f"{root / 'val'} must have the same class folders as {root / 'train'}; "
                f"missing: {missing}, not in train: {extra}"
            )
        return scan_folder(root / "train", classes), scan_folder(root / "val", classes)

    def make_dataset(self, items, targets, indices, transform, rank) -> TransformedDataset:
        mode = "RGB" if self.native_chans == 3 else "L"
        return ImageFileDataset(items, targets, transform, indices, rank, mode=mode)

    def train_transforms(self) -> Transforms:
        size = (self.image_size, self.image_size)
        return [A.RandomResizedCrop(size=size, scale=(0.08, 1.0)), A.HorizontalFlip(p=0.5)]

    def eval_transforms(self) -> Transforms:
        return [
            A.SmallestMaxSize(max_size=int(self.image_size / CROP_PCT)),
            A.CenterCrop(self.image_size, self.image_size),
        ]
