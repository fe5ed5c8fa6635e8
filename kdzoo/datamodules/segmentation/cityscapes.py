"""Cityscapes (fine annotations), in the official / mmsegmentation folder layout.

Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016,
arXiv:1604.01685; https://www.cityscapes-dataset.com. Layout and conventions: kdzoo spec
``segmentation.md`` §5.1 (mmseg's ``CityscapesDataset``; the labelId -> trainId table of
``cityscapesscripts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdzoo.datamodules.segmentation.base import (
    IGNORE_INDEX,
    SegItem,
    SegmentationDataModule,
    Size,
    missing_split,
)
from kdzoo.errors import DataError

__all__ = ["CITYSCAPES_CLASSES", "LABEL_ID_TO_TRAIN_ID", "Cityscapes", "label_id_lut"]

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: Cityscapes labelId -> trainId (``cityscapesscripts/helpers/labels.py``); others are ignored.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def label_id_lut() -> np.ndarray:
    """256-entry table mapping Cityscapes labelIds to trainIds (255 for every other id)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class Cityscapes(SegmentationDataModule):
    """Cityscapes fine: 19 classes, 2,975 train / 500 val images of 2048x1024.

    Reads ``leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with the mask
    ``gtFine/{split}/<city>/..._gtFine_labelTrainIds.png`` (written by mmseg's
    ``tools/dataset_converters/cityscapes.py``) or, where that is absent,
    ``..._gtFine_labelIds.png`` mapped to trainIds in the loader as CIRKD/LAD do (ids outside the
    19 classes become 255). ``test`` is the **val** split: the test labels are not public
    (results on it come from the benchmark server), so papers report val mIoU.

    Default crop 512x1024, the mmseg/CIRKD Cityscapes crop.

    Args:
        crop_size: training crop (int or ``[height, width]``).
        Other arguments: see :class:`SegmentationDataModule`.
    """

    name = "Cityscapes"
    data_subdir = "cityscapes"
    expected_files = ("leftImg8bit", "gtFine")
    install_hint = (
        "register at https://www.cityscapes-dataset.com, download leftImg8bit_trainvaltest.zip "
        "and gtFine_trainvaltest.zip and unzip both into one folder DIR (optionally write "
        "*_labelTrainIds.png with mmseg's tools/dataset_converters/cityscapes.py)"
    )
    mask_fix = (
        "*_gtFine_labelTrainIds.png must hold trainIds 0..18 and 255; this file looks like it "
        "holds labelIds: convert labelIds to trainIds (mmseg's "
        "tools/dataset_converters/cityscapes.py), or delete the *_labelTrainIds.png files so "
        "kdzoo maps *_gtFine_labelIds.png itself"
    )
    default_class_names = CITYSCAPES_CLASSES

    def __init__(self, *, crop_size: Size = (512, 1024), **kwargs: Any) -> None:
        super().__init__(crop_size=crop_size, **kwargs)

    def load_split(self, split: str) -> list[SegItem]:
        root = self.find_root()
        folder = "train" if split == "train" else "val"  # test labels are not public
        pattern = "*/*_leftImg8bit.png"
        images = sorted((root / "leftImg8bit" / folder).glob(pattern))
        if not images:
            raise missing_split(root, f"leftImg8bit/{folder}", pattern)
        lut = label_id_lut()
        return [self._item(root, folder, image, lut) for image in images]

    @staticmethod
    def _item(root: Path, folder: str, image: Path, lut: np.ndarray) -> SegItem:
        stem = image.name.removesuffix("_leftImg8bit.png")
        labels = root / "gtFine" / folder / image.parent.name
        train_ids = labels / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = labels / f"{stem}_gtFine_labelIds.png"
        if train_ids.exists():
            mask, mapping = train_ids, None
        elif label_ids.exists():
            mask, mapping = label_ids, lut
        else:
            raise DataError(
                f"{image}: no mask {train_ids.name} or {label_ids.name} in {labels} "
                "(unzip gtFine_trainvaltest.zip into the same folder as leftImg8bit)"
            )
        relpath = image.relative_to(root).as_posix()
        return SegItem(image=image, mask=mask, key=stem, relpath=relpath, lut=mapping)
