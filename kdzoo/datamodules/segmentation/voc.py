"""Pascal VOC 2012 segmentation, optionally with the SBD augmented training set (trainaug).

Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010; SBD: Hariharan
et al., "Semantic Contours from Inverse Detectors", ICCV 2011. Layout: kdzoo spec
``segmentation.md`` §5.3 (mmseg's ``PascalVOCDataset`` and ``tools/dataset_converters/voc_aug.py``,
whose ``SegmentationClassAug`` / ``trainaug.txt`` CIRKD, LAD, U2PL and FST also read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdzoo.datamodules.segmentation.base import SegItem, SegmentationDataModule
from kdzoo.errors import DataError

__all__ = ["VOC_CLASSES", "PascalVOC"]

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

SPLITS = "ImageSets/Segmentation"
# mmseg's voc_aug.py writes trainaug.txt; CIRKD/LAD call the same list train_aug.txt.
AUG_LISTS = ("trainaug.txt", "train_aug.txt")


class PascalVOC(SegmentationDataModule):
    """Pascal VOC 2012: 21 classes (background + 20), 1,464 train / 1,449 val images.

    Reads ``JPEGImages/<id>.jpg`` and the palette PNG ``SegmentationClass/<id>.png`` by its
    **indices** (255 marks object boundaries: ignored) for the ids of
    ``ImageSets/Segmentation/{train,val}.txt``. With ``aug=True`` training uses the 10,582 ids of
    ``trainaug.txt`` (or ``train_aug.txt``) with masks from ``SegmentationClassAug/<id>.png``
    (falling back to ``SegmentationClass``), mmseg's ``voc_aug.py`` layout. ``test`` is val.
    Images vary in size: keep ``eval_batch_size=1`` unless ``eval_size`` is set.

    Args:
        aug: train on the SBD-augmented ``trainaug`` list.
        Other arguments: see :class:`SegmentationDataModule`.
    """

    name = "Pascal VOC 2012"
    data_subdir = "voc"
    layouts = ("", "VOC2012", "VOCdevkit/VOC2012")
    expected_files = ("JPEGImages", SPLITS)
    install_hint = (
        "download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012 "
        "and unpack it into DIR; for aug=True also run mmseg's "
        "tools/dataset_converters/voc_aug.py on SBD (benchmark_RELEASE)"
    )
    mask_fix = (
        "VOC masks must hold palette indices 0..20 and 255; a mask converted to greyscale by "
        "luminance (PIL convert('L')) or saved as RGB colours gives other values: use the "
        "original SegmentationClass PNGs or SegmentationClassAug from mmseg's voc_aug.py"
    )
    default_class_names = VOC_CLASSES

    def __init__(self, *, aug: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aug = aug

    def load_split(self, split: str) -> list[SegItem]:
        root = self.find_root()
        if split == "train" and self.aug:
            mask_dirs = ("SegmentationClassAug", "SegmentationClass")
            return self._items(root, self._aug_list(root), mask_dirs)
        mask_dirs = ("SegmentationClass", "SegmentationClassAug")
        listing = root / SPLITS / ("train.txt" if split == "train" else "val.txt")
        if not listing.is_file():
            raise DataError(f"{root}: the split list {listing} does not exist")
        return self._items(root, listing, mask_dirs)

    @staticmethod
    def _aug_list(root: Path) -> Path:
        for name in AUG_LISTS:
            if (root / SPLITS / name).is_file():
                return root / SPLITS / name
        raise DataError(
            f"aug=True needs {' or '.join(AUG_LISTS)} in {root / SPLITS}: write it (and "
            "SegmentationClassAug/) with mmseg's tools/dataset_converters/voc_aug.py, or pass "
            "aug=false"
        )

    @staticmethod
    def _items(root: Path, listing: Path, mask_dirs: tuple[str, str]) -> list[SegItem]:
        items = []
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            # Lists hold ids; CIRKD-style lists hold "/JPEGImages/<id>.jpg /Seg.../<id>.png".
            key = Path(line.split()[0]).stem
            image = root / "JPEGImages" / f"{key}.jpg"
            masks = [root / d / f"{key}.png" for d in mask_dirs]
            mask = next((m for m in masks if m.exists()), None)
            if not image.exists() or mask is None:
                missing = image if not image.exists() else " or ".join(map(str, masks))
                raise DataError(f"{listing} lists {key!r} but {missing} does not exist")
            relpath = image.relative_to(root).as_posix()
            items.append(SegItem(image=image, mask=mask, key=key, relpath=relpath))
        if not items:
            raise DataError(f"{listing} lists no images")
        return items
