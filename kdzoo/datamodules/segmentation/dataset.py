"""Datasets of kdzoo's semantic-segmentation DataModules, and the helpers they share.

Items (:class:`SegItem` files, :class:`ArrayItems` arrays), the per-item mask checks
(:func:`encode_mask`: ids against ``0..C-1`` and :data:`IGNORE_INDEX`; image/mask sizes), the
datasets that run image and mask jointly through one albumentations pipeline, the batch
``collate``, and the split-list helpers. The DataModules live in
:mod:`kdzoo.datamodules.segmentation.base`, which re-exports the public names.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image
from torch.utils.data import default_collate

from kdzoo.datamodules.loading import TransformedDataset
from kdzoo.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "ArrayItems",
    "ArraySegmentationDataset",
    "FileSegmentationDataset",
    "SegItem",
    "SegmentationDataset",
    "collate",
    "encode_mask",
    "read_split_list",
]

#: The "ignore" class id, on disk (mmseg, CIRKD, U2PL, DAFormer) and in every batch.
IGNORE_INDEX = 255


# -- items --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SegItem:
    """One image file of a dataset, with its mask file (``None``: unlabelled only).

    Attributes:
        image: the image file.
        mask: the mask file (class ids, or raw ids that ``lut`` maps to class ids).
        key: the dataset's id of the item (e.g. ``aachen_000000_000019``, ``2007_000032``), one
            of the names a ``labelled_list`` line may use.
        relpath: the image path relative to the dataset root (the other accepted name).
        lut: 256 entries mapping the mask file's values to class ids (e.g. Cityscapes labelIds
            to trainIds); ``None`` when the file already holds class ids.
    """

    image: Path
    mask: Path | None
    key: str
    relpath: str
    lut: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class ArrayItems:
    """In-memory items: uint8 images ``(N, H, W, 3)`` and uint8 masks ``(N, H, W)`` (or None)."""

    images: np.ndarray
    masks: np.ndarray | None

    def __len__(self) -> int:
        return len(self.images)


# -- mask checks --------------------------------------------------------------------------------


def encode_mask(
    raw: np.ndarray, lut: np.ndarray | None, num_classes: int, where: str, fix: str
) -> np.ndarray:
    """Map a mask file's values to class ids and check them; returns a uint8 ``H x W`` mask.

    Args:
        raw: the mask as read (``np.array(PIL.Image.open(path))``: palette PNGs give indices).
        lut: 256 entries mapping raw values to class ids, or ``None`` (raw values are class ids).
        num_classes: valid ids are ``0..num_classes-1`` and :data:`IGNORE_INDEX`.
        where: the file or item named in errors.
        fix: what the user should do about out-of-range ids (dataset specific).

    Raises:
        DataError: for a colour (3-channel) mask, or ids outside the valid set, naming the ids
            as stored in the file and, when ``lut`` maps them, the class ids they became.
    """
    if raw.ndim != 2:
        raise DataError(
            f"{where}: mask has shape {raw.shape}; expected a single-channel PNG of class ids "
            "(a colour-coded mask, e.g. Cityscapes *_color.png, cannot be used)"
        )
    if raw.dtype != np.uint8:
        # 16/32-bit PNGs: fine if every value fits the 8-bit ids kdzoo uses.
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            big = np.unique(raw[(raw < 0) | (raw > 255)])[:10].tolist()
            raise DataError(f"{where}: mask ids {big} do not fit 0..255. {fix}")
        raw = raw.astype(np.uint8)
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))  # cheaper than np.unique
    mapped = lut[present] if lut is not None else present
    bad = (mapped >= num_classes) & (mapped != IGNORE_INDEX)
    if bad.any():
        stored = present[bad].tolist()
        became = "" if lut is None else f" (class ids {mapped[bad].tolist()} after mapping)"
        raise DataError(
            f"{where}: mask holds ids {stored}{became} outside 0..{num_classes - 1} and "
            f"{IGNORE_INDEX} (ignore). {fix}"
        )
    return lut[raw] if lut is not None else raw


def _check_size(mask: np.ndarray, image: np.ndarray, where: str) -> None:
    if mask.shape[:2] != image.shape[:2]:
        (mh, mw), (ih, iw) = mask.shape[:2], image.shape[:2]
        raise DataError(
            f"{where}: mask is {mh}x{mw} (HxW) but its image is {ih}x{iw}; every mask must have "
            "its image's size (re-export the mask, or remove the pair from the dataset)"
        )


# -- datasets -----------------------------------------------------------------------------------


class SegmentationDataset(TransformedDataset):
    """Image/mask pairs run jointly through one albumentations pipeline, checked per item.

    Items are ``(image float32 3 x H x W, mask int64 H x W)``, or only the image when
    ``with_masks=False`` (the unlabelled set). Subclasses read the data.
    """

    def __init__(
        self,
        num_items: int,
        transform: A.Compose,
        indices: Any,
        rank: int,
        *,
        with_masks: bool,
        num_classes: int,
        mask_fix: str,
    ) -> None:
        # TransformedDataset keeps per-item class targets; segmentation has none, so zeros only
        # give it the item count.
        super().__init__(np.zeros(num_items, dtype=np.int64), transform, indices, rank)
        self.with_masks = with_masks
        self.num_classes = num_classes
        self.mask_fix = mask_fix

    @abstractmethod
    def read_mask(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The mask of item ``j`` as stored, and the lookup table mapping it to class ids."""

    @abstractmethod
    def describe(self, j: int) -> str:
        """The file (or item) named in error messages about item ``j``."""

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        self.seed_item(j)
        image = self.load_image(j)
        if not self.with_masks:
            return self.transform(image=image)["image"]
        raw, lut = self.read_mask(j)
        where = self.describe(j)
        mask = encode_mask(raw, lut, self.num_classes, where, self.mask_fix)
        _check_size(mask, image, where)
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()

    def with_transform(self, transform: A.Compose) -> SegmentationDataset:
        """A view of the same items through another pipeline (with its own RNG)."""
        other = copy.copy(self)
        other.transform = transform
        other.reseed(0)
        return other


class FileSegmentationDataset(SegmentationDataset):
    """Items read lazily from image and mask files (:class:`SegItem`)."""

    def __init__(self, items: Sequence[SegItem], transform: A.Compose, indices: Any, rank: int,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(len(items), transform, indices, rank, **kwargs)
        self.items = list(items)

    def load_image(self, j: int) -> np.ndarray:
        with Image.open(self.items[j].image) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def read_mask(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        item = self.items[j]
        if item.mask is None:
            raise DataError(f"{item.image}: this image has no mask but is used as labelled data")
        # Never convert(): palette PNGs (VOC) must give their indices, not a luminance.
        with Image.open(item.mask) as mask:
            return np.array(mask), item.lut

    def describe(self, j: int) -> str:
        item = self.items[j]
        return f"{item.mask} (image {item.image})"


class ArraySegmentationDataset(SegmentationDataset):
    """In-memory items (:class:`ArrayItems`)."""

    def __init__(self, data: ArrayItems, transform: A.Compose, indices: Any, rank: int,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(len(data), transform, indices, rank, **kwargs)
        self.data = data

    def load_image(self, j: int) -> np.ndarray:
        return self.data.images[j]

    def read_mask(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.data.masks is None:
            raise DataError(f"item {j} has no mask but is used as labelled data")
        return self.data.masks[j], None

    def describe(self, j: int) -> str:
        return f"item {j}"


def collate(batch: list) -> Any:
    """``default_collate`` returning ``(images, masks)`` tuples, with a clear error for images of
    different sizes in one batch."""
    try:
        out = default_collate(batch)
    except RuntimeError:
        images = [b[0] if isinstance(b, tuple) else b for b in batch]
        sizes = sorted({tuple(x.shape[-2:]) for x in images})
        if len(sizes) > 1:
            raise DataError(
                f"one batch holds images of different sizes {sizes}: set eval_batch_size=1 "
                "(the default for datasets with varying image sizes) or eval_size"
            ) from None
        raise
    return tuple(out) if isinstance(out, list) else out


# -- split lists --------------------------------------------------------------------------------


def read_split_list(path: str | Path) -> list[str]:
    """Entries of a split file: the first field of every non-empty, non-``#`` line.

    U2PL/FST lists hold one id (``2007_000032``) or one relative image path
    (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``) per line; CIRKD-style
    lists add the mask path as a second field, which is ignored.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"labelled_list {path} does not exist or is not a file")
    entries = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            entries.append(fields[0].lstrip("/").removeprefix("./"))
    if not entries:
        raise DataError(f"labelled_list {path} lists no items")
    return entries


def _item_names(item: SegItem) -> tuple[str, ...]:
    name = Path(item.relpath).name
    return (item.key, item.relpath, name, Path(name).stem)
