"""ADE20K SceneParsing (``ADEChallengeData2016``), in the mmsegmentation folder layout.

Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017 (and "Semantic Understanding of
Scenes through the ADE20K Dataset", IJCV 2019, arXiv:1608.05442);
http://sceneparsing.csail.mit.edu. Layout and ``reduce_zero_label``: kdzoo spec
``segmentation.md`` §5.2 (mmseg's ``ADE20KDataset``; class names in its order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdzoo.datamodules.segmentation.base import (
    IGNORE_INDEX,
    SegItem,
    SegmentationDataModule,
    missing_split,
)
from kdzoo.errors import DataError

__all__ = ["ADE20K", "ADE20K_CLASSES", "reduce_zero_label_lut"]

# mmseg's ADE20KDataset.METAINFO["classes"] (its "bed " has a stray trailing space, dropped here).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def reduce_zero_label_lut() -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 ("other") -> 255, k -> k - 1, 255 stays 255."""
    lut = (np.arange(256) - 1).astype(np.uint8)
    lut[[0, 255]] = IGNORE_INDEX
    return lut


class ADE20K(SegmentationDataModule):
    """ADE20K SceneParsing: 150 classes, 20,210 training / 2,000 validation images.

    Reads ``images/{training,validation}/*.jpg`` and ``annotations/{...}/<same name>.png``
    (0 = "other", 1..150 = classes) and applies ``reduce_zero_label`` (0 -> 255, k -> k - 1), as
    mmseg and CIRKD do. ``test`` is the validation split (the challenge test set has no public
    labels). Images vary in size: keep ``eval_batch_size=1`` unless ``eval_size`` is set.

    Args: see :class:`SegmentationDataModule`.
    """

    name = "ADE20K"
    data_subdir = "ade"
    layouts = ("", "ADEChallengeData2016")
    expected_files = ("images", "annotations")
    install_hint = (
        "download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu and unzip it "
        "into DIR"
    )
    mask_fix = (
        "ADEChallengeData2016 annotations hold 0 (other) and 1..150, which kdzoo maps with "
        "reduce_zero_label (0 -> 255, k -> k-1); larger ids mean this is not a SceneParsing "
        "150-class annotation (e.g. a full-ADE20K index mask): use the ADEChallengeData2016 "
        "annotations/ folder"
    )
    default_class_names = ADE20K_CLASSES

    def load_split(self, split: str) -> list[SegItem]:
        root = self.find_root()
        folder = "training" if split == "train" else "validation"
        images = sorted((root / "images" / folder).glob("*.jpg"))
        if not images:
            raise missing_split(root, f"images/{folder}", "*.jpg")
        lut = reduce_zero_label_lut()
        return [self._item(root, folder, image, lut) for image in images]

    @staticmethod
    def _item(root: Path, folder: str, image: Path, lut: np.ndarray) -> SegItem:
        mask = root / "annotations" / folder / f"{image.stem}.png"
        if not mask.exists():
            raise DataError(f"{image}: its annotation {mask} does not exist")
        relpath = image.relative_to(root).as_posix()
        return SegItem(image=image, mask=mask, key=image.stem, relpath=relpath, lut=lut)
