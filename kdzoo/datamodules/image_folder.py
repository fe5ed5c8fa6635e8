"""ImageNet-style folder DataModule: ``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*``.

Splits: the ``train`` folder is split (seeded, ``val_fraction``) into train and val, and the
``val`` folder is the *test* split, since ImageNet-style datasets publish labelled validation
images but no labelled test set, and papers report accuracy on that folder. Images are read lazily
with PIL, so the dataset never has to fit in memory.

A user's folder is checked as it is read: a class folder without images, or a file PIL cannot
decode, is an error that names it (``skip_broken_images`` drops unreadable files instead).
``kdzoo predict`` runs over any split (``predict_split``) or over a folder of unlabelled images
(``predict_dir``), and writes each prediction with its file and class name.
"""

import sys
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image, UnidentifiedImageError

from kdzoo.datamodules.base import ImageClassificationDataModule, PredictSplit, Transforms
from kdzoo.datamodules.loading import TransformedDataset
from kdzoo.datamodules.skeleton import DatasetNotFoundError
from kdzoo.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Greyscale equivalents (channel averages), used when in_chans=1.
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)
# Eval resizes the shorter side to image_size / CROP_PCT, then centre-crops (the usual 0.875).
CROP_PCT = 0.875
SKIP_HINT = "pass --data.skip_broken_images true to skip every unreadable image"
#: How many skipped files are named in the report of ``skip_broken_images``.
SHOW_SKIPPED = 5


def read_image(path: Path, mode: str) -> np.ndarray:
    """The uint8 ``H x W x C`` pixels of ``path`` in PIL ``mode``.

    Raises:
        DataError: naming the file, if PIL cannot identify or fully decode it.
    """
    try:
        with Image.open(path) as image:
            # PIL decodes lazily: load() here, so that a truncated file fails inside the try.
            image.load()
            pixels = np.asarray(image.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(
            f"cannot read image {path}: not an image file PIL can identify; remove it, or "
            f"{SKIP_HINT}"
        ) from None
    # OSError: truncated or corrupt data; SyntaxError: how some PIL decoders report bad chunks.
    except (OSError, SyntaxError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(
            f"cannot read image {path}: {reason}; fix or remove it, or {SKIP_HINT}"
        ) from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


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
        return read_image(self._paths[j], self.mode)


def _class_dirs(directory: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``directory`` (empty if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(directory: Path, recursive: bool = False) -> list[Path]:
    """Sorted files with an image extension in ``directory`` (and its visible sub-folders)."""
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p for p in found
        if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )  # fmt: skip


def _empty_class_error(folder: Path, what: str = "no images") -> DataError:
    return DataError(
        f"class folder {folder} has {what} (extensions {', '.join(IMG_EXTENSIONS)}), so its "
        "class could never be learnt or tested: remove the folder or add images to it"
    )


def scan_folder(directory: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``directory/<class>/`` and their class indices, in a fixed order.

    Raises:
        DataError: naming the first class folder that holds no image file (files without an
            image extension do not count): the model would get an output no image ever has.
    """
    paths, targets = [], []
    for index, name in enumerate(classes):
        files = _image_files(directory / name)
        if not files:
            raise _empty_class_error(directory / name)
        paths += files
        targets += [index] * len(files)
    return paths, targets


class ImageFolder(ImageClassificationDataModule):
    """ImageNet-style folders: ``root/train/<class>/*`` (split into train and val) and
    ``root/val/<class>/*`` (the test split).

    Train: RandomResizedCrop(image_size, scale=(0.08, 1)) + horizontal flip. Eval: resize the
    shorter side to ``int(image_size / 0.875)``, centre-crop ``image_size``.

    Every class folder must hold at least one image file (a ``DataError`` names an empty one),
    and a file PIL cannot decode is a ``DataError`` naming it when it is read.

    Args:
        in_chans: 3 reads RGB, 1 reads greyscale.
        mean: normalisation mean (default ImageNet's, or its channel average for ``in_chans=1``).
        std: normalisation std (as ``mean``).
        skip_broken_images: in ``setup()``, decode every file once and leave out those PIL
            cannot read (not an image, truncated, corrupt), printing how many were skipped and
            the first names; ``False`` (default) fails on the first one read instead.
        predict_split: the split ``kdzoo predict`` runs over: ``"test"`` (the ``val`` folder),
            ``"val"`` or ``"train"`` (with the eval transforms, never the augmentations).
        predict_dir: predict over the images of this folder instead, searched recursively
            (sub-folders need not be classes, no labels needed), with the eval transforms. The
            class names still come from ``root/train``.
        Other arguments: see :class:`ImageClassificationDataModule`.
    """

    name = "ImageFolder dataset"
    data_subdir = "imagenet"
    expected_files = ("train", "val")

    def __init__(
        self,
        *,
        image_size: int = 224,
        in_chans: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        skip_broken_images: bool = False,
        predict_split: PredictSplit = "test",
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        # No class selection: the class names are the folder names, which data.classes would
        # need in __init__, before the data is located (passing it here keeps it out of the
        # options).
        super().__init__(image_size=image_size, predict_split=predict_split, classes=None, **kwargs)
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
        self.skip_broken_images = skip_broken_images
        self.predict_dir = predict_dir
        #: The files ``skip_broken_images`` left out, filled by ``setup()``.
        self.skipped_images: list[Path] = []
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
        train, test = scan_folder(root / "train", classes), scan_folder(root / "val", classes)
        if self.skip_broken_images:
            train = self._readable(root / "train", *train)
            test = self._readable(root / "val", *test)
        return train, test

    def _readable(
        self, folder: Path, paths: list[Path], targets: list[int]
    ) -> tuple[list[Path], list[int]]:
        """``paths`` and ``targets`` without the files PIL cannot decode (kept in
        ``skipped_images``); an error if that leaves a class without images."""
        keep = self._decodable(paths)
        paths = [p for p, ok in zip(paths, keep, strict=True) if ok]
        targets = [t for t, ok in zip(targets, keep, strict=True) if ok]
        emptied = sorted(set(range(self.num_classes)) - set(targets))
        if emptied:
            raise _empty_class_error(folder / self.class_names[emptied[0]], "no readable images")
        return paths, targets

    def _decodable(self, paths: list[Path]) -> list[bool]:
        """Whether each file decodes fully; the others are appended to ``skipped_images``."""
        keep = []
        for path in paths:
            try:
                read_image(path, self._mode)
            except DataError:
                self.skipped_images.append(path)
                keep.append(False)
            else:
                keep.append(True)
        return keep

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        super().setup(stage)
        if self.predict_dir is not None:
            self.predict = self._predict_dir_dataset()
        skipped = self.skipped_images
        if skipped and (self.trainer is None or self.trainer.is_global_zero):
            names = ", ".join(str(p) for p in skipped[:SHOW_SKIPPED])
            more = f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else ""
            print(
                f"kdzoo: ImageFolder skipped {len(skipped)} unreadable "
                f"image{'s' if len(skipped) != 1 else ''} (skip_broken_images): {names}{more}",
                file=sys.stderr,
            )

    def _predict_dir_dataset(self) -> TransformedDataset:
        """The ``predict_dir`` images (label -1) with the eval transforms."""
        transform = self.build_transform(train=False)
        directory = Path(self.predict_dir).expanduser()
        paths = _image_files(directory, recursive=True) if directory.is_dir() else []
        if self.skip_broken_images:
            paths = [p for p, ok in zip(paths, self._decodable(paths), strict=True) if ok]
        if not paths:
            problem = "holds no readable image file" if directory.is_dir() else "is not a folder"
            raise DataError(
                f"predict_dir {directory} {problem} (searched recursively for the extensions "
                f"{', '.join(IMG_EXTENSIONS)}): pass a folder of images"
            )
        return self.make_dataset(paths, [-1] * len(paths), None, transform, self.global_rank)

    @property
    def _mode(self) -> str:
        return "RGB" if self.native_chans == 3 else "L"

    def make_dataset(self, items, targets, indices, transform, rank) -> TransformedDataset:
        return ImageFileDataset(items, targets, transform, indices, rank, mode=self._mode)

    def train_transforms(self) -> Transforms:
        size = (self.image_size, self.image_size)
        return [A.RandomResizedCrop(size=size, scale=(0.08, 1.0)), A.HorizontalFlip(p=0.5)]

    def eval_transforms(self) -> Transforms:
        return [
            A.SmallestMaxSize(max_size=int(self.image_size / CROP_PCT)),
            A.CenterCrop(self.image_size, self.image_size),
        ]
