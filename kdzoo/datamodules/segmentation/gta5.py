"""GTA5 (synthetic street scenes), the source domain of GTA5 -> Cityscapes adaptation.

Richter et al., "Playing for Data: Ground Truth from Computer Games", ECCV 2016,
arXiv:1608.02192; https://download.visinf.tu-darmstadt.de/data/from_games. Layout: kdzoo spec
``segmentation.md`` §5.4 (the DAFormer/FST ``GTADataset`` and ``tools/convert_datasets/gta.py``;
mmseg 1.x has no GTA5 class).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdzoo.datamodules.segmentation.base import SegItem, SegmentationDataModule, missing_split
from kdzoo.datamodules.segmentation.cityscapes import CITYSCAPES_CLASSES, label_id_lut
from kdzoo.datamodules.skeleton import check_fraction
from kdzoo.errors import DataError

__all__ = ["GTA5"]


class GTA5(SegmentationDataModule):
    """GTA5: 24,966 frames of 1914x1052, labelled with the 19 Cityscapes training classes.

    Reads ``images/<n>.png`` with the mask ``labels/<n>_labelTrainIds.png`` (written by the
    DAFormer/FST converter) or, where that is absent, ``labels/<n>.png`` (Cityscapes labelIds,
    mapped to trainIds in the loader; other ids become 255). GTA5 has no official split: a seeded
    random ``val_fraction`` of the frames (``split_seed``; at least one frame) is the val split,
    and ``test`` is that same val split. Domain-adaptation papers train on all frames and
    evaluate on Cityscapes val, so this val split only monitors fitting the source domain.

    Args:
        val_fraction: share of the frames held out as val, in (0, 1).
        Other arguments: see :class:`SegmentationDataModule`.
    """

    name = "GTA5"
    data_subdir = "gta"
    expected_files = ("images", "labels")
    install_hint = (
        "download the 10 image and label parts from "
        "https://download.visinf.tu-darmstadt.de/data/from_games and unpack them into "
        "DIR/images and DIR/labels (optionally write *_labelTrainIds.png with DAFormer's "
        "tools/convert_datasets/gta.py)"
    )
    mask_fix = (
        "labels/*_labelTrainIds.png must hold trainIds 0..18 and 255: convert labelIds to "
        "trainIds again (DAFormer/FST tools/convert_datasets/gta.py), or delete the "
        "*_labelTrainIds.png files so kdzoo maps labels/<n>.png (labelIds) itself"
    )
    default_class_names = CITYSCAPES_CLASSES

    def __init__(self, *, val_fraction: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_fraction("val_fraction", val_fraction)
        self.val_fraction = val_fraction
        self._frames: list[SegItem] | None = None

    def _all_frames(self) -> list[SegItem]:
        if self._frames is None:
            root = self.find_root()
            images = sorted((root / "images").glob("*.png"))
            if not images:
                raise missing_split(root, "images", "*.png")
            lut = label_id_lut()
            self._frames = []
            for image in images:
                train_ids = root / "labels" / f"{image.stem}_labelTrainIds.png"
                label_ids = root / "labels" / image.name
                if train_ids.exists():
                    mask, mapping = train_ids, None
                elif label_ids.exists():
                    mask, mapping = label_ids, lut
                else:
                    raise DataError(f"{image}: no mask {train_ids} or {label_ids}")
                relpath = image.relative_to(root).as_posix()
                item = SegItem(image=image, mask=mask, key=image.stem, relpath=relpath, lut=mapping)
                self._frames.append(item)
        return self._frames

    def load_split(self, split: str) -> list[SegItem]:
        frames = self._all_frames()
        n = len(frames)
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise DataError(
                f"val_fraction={self.val_fraction} of {n} frames leaves no training data"
            )
        # Its own generator: the split never depends on (or disturbs) the global RNG.
        perm = np.random.default_rng(self.split_seed).permutation(n)
        chosen = np.sort(perm[n_val:] if split == "train" else perm[:n_val])
        return [frames[i] for i in chosen]
