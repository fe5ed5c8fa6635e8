"""NYU Depth V2 (labelled subset): RGB paired with depth for 40-class semantic segmentation.

Silberman, Hoiem, Kohli, Fergus, "Indoor Segmentation and Support Inference from RGBD Images",
ECCV 2012; the 40-class labels are Gupta, Arbelaez, Malik, "Perceptual Organization and
Recognition of Indoor Scenes from RGB-D Images", CVPR 2013. This is the dense benchmark of
MST-Distill (Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025, arXiv:2507.07015), read as its official code reads it
(``utils.get_nyu_depth_v2`` of https://github.com/Gray-OREO/MST-Distill).

Files (``root``): ``nyu_depth_v2_labeled.mat`` (the official MATLAB v7.3 = HDF5 file, read with
the optional dependency ``h5py``; the repo's merged ``NYU-Depth-V2_data.mat`` is accepted too)
holding ``images`` ``(N, 3, W, H)`` uint8 and ``depths`` ``(N, W, H)`` float. The 40-class labels
are taken from, in this order: a ``labels40`` dataset inside that file (the repo's merged file has
one), ``labels40.mat`` next to it (https://github.com/ankurhanda/nyuv2-meta-data; MATLAB v5
``(H, W, N)``, or v7.3 ``(N, W, H)``), or ``labels40.npy`` ``(N, H, W)``.

What a sample is, following the repo:

- m1 = RGB ``(3, H, W)``, min-max normalised per channel over the whole dataset (the repo's
  ``min_max_normalize`` on a 4-D array); m2 = depth ``(1, H, W)``, min-max normalised per image
  (its 3-D case);
- y = mask ``(H, W)`` int64. ``labels40`` id 0 is "void" (unlabelled); the repo keeps 41 output
  channels and drops id 0 through ``CrossEntropyLoss(ignore_index=0)`` and its mIoU. kdzoo's dense
  convention is ignore index 255, so void becomes 255 and ids ``1..40`` become ``0..39``
  (``num_classes`` 40; mmsegmentation's ``reduce_zero_label``). ``keep_void_id=True`` keeps ids
  ``1..40`` as they are with ``num_classes`` 41 (channel 0 "void" is never a target), for a
  41-channel head like the repo's FuseNet;
- splits: MST-Distill's random 60/20/20 split of the 1,449 images (not the official 795/654
  split), from ``split_seed`` or from the repo's ``metadata/NYU-Depth-V2_indices.csv``
  (``split_file``, column ``group_<split_seed>``), which reproduces its splits exactly;
- ``image_size`` other than the stored 480x640 resizes after normalising (RGB and depth area- or
  bilinear-interpolated, masks nearest), e.g. for CPU experiments.

The whole file is read into memory at ``setup()`` (about 3.5 GB: images stay uint8, normalised
item by item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kdzoo.datamodules.paired.base import (
    MissingDataFileError,
    PairedDataset,
    PairedInfo,
    PairedModalityDataModule,
    as_tensor,
    check_lengths,
    min_max,
    random_split,
)
from kdzoo.datamodules.skeleton import check_arg
from kdzoo.errors import DataError, KDZooError

__all__ = ["NYU40_CLASSES", "NYUDepthV2"]

MAT_FILES = ("nyu_depth_v2_labeled.mat", "NYU-Depth-V2_data.mat")
NATIVE_SIZE = (480, 640)
VOID, IGNORE_INDEX = 0, 255
# Gupta et al.'s 40 classes, labels40 ids 1..40 in order (spelling as in the NYUv2 meta data).
NYU40_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refridgerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)


class MissingDependencyError(KDZooError, ImportError):
    """An optional package needed for this dataset is not installed."""


def _h5py():
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(
            "reading NYU Depth V2's .mat file (MATLAB v7.3 = HDF5) needs h5py: "
            "pip install h5py (or pip install 'kdzoo[nyu]')"
        ) from None
    return h5py


def _pair(value: Any) -> tuple[int, int] | None:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    ok = len(pair) == 2 and all(isinstance(v, int) and v >= 1 for v in pair)
    return pair if ok else None


def read_labels40_mat(path: Path, n: int, hw: tuple[int, int]) -> np.ndarray:
    """``labels40`` of a MATLAB v5 file (``(H, W, N)``) or a v7.3 one (``(N, W, H)``), as
    ``(N, H, W)``."""
    from scipy.io import loadmat

    try:
        labels = loadmat(path, variable_names=["labels40"]).get("labels40")
        order = (2, 0, 1)
    except (NotImplementedError, ValueError) as e:  # scipy reads MATLAB <= v7.2; v7.3 is HDF5
        h5py = _h5py()
        if not h5py.is_hdf5(path):
            raise DataError(f"{path}: not a readable .mat file ({e})") from None
        with h5py.File(path, "r") as f:
            labels = f["labels40"][()] if "labels40" in f else None
        order = (0, 2, 1)
    if labels is None:
        raise DataError(f"{path} holds no variable 'labels40'")
    expected = (hw[0], hw[1], n) if order == (2, 0, 1) else (n, hw[1], hw[0])
    if labels.shape != expected:
        raise DataError(
            f"{path}: labels40 has shape {labels.shape}, expected {expected} "
            f"for {n} images of {hw[0]}x{hw[1]}"
        )
    return labels.transpose(order)


class NYUDepthV2(PairedModalityDataModule):
    """NYU Depth V2 RGB/depth pairs with 40-class masks (see the module docstring).

    Found under ``$KDZOO_DATA/nyu_depth_v2`` or ``~/.cache/kdzoo/data/nyu_depth_v2`` without
    ``root``: the directory holding ``nyu_depth_v2_labeled.mat`` (and ``labels40.mat`` or
    ``labels40.npy``).

    Args:
        batch_size: samples per batch (MST-Distill uses 6).
        split_file: the repo's ``metadata/NYU-Depth-V2_indices.csv``; column
            ``group_<split_seed>`` gives the permutation (``split_seed`` otherwise seeds the
            60/20/20 permutation).
        image_size: ``[height, width]`` (or one int) of the samples; the stored 480x640 is
            resized to it when different.
        keep_void_id: keep ``labels40``'s ids (``num_classes`` 41) instead of shifting them to
            ``0..39``; void is 255 either way.
        Other arguments: see :class:`~kdzoo.datamodules.paired.base.PairedModalityDataModule`.
    """

    name = "NYU Depth V2 (labelled)"
    data_subdir = "nyu_depth_v2"
    install_hint = (
        "download nyu_depth_v2_labeled.mat from "
        "https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html and labels40.mat from "
        "https://github.com/ankurhanda/nyuv2-meta-data into one directory"
    )
    task = "segmentation"
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        *,
        batch_size: int = 6,
        split_file: str | None = None,
        image_size: int | tuple[int, int] = NATIVE_SIZE,
        keep_void_id: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        size = _pair(image_size)
        check_arg("image_size", image_size, size is not None, "an integer >= 1 or [height, width]")
        self.image_size: tuple[int, int] = size
        self.split_file, self.keep_void_id = split_file, keep_void_id

    def describe(self) -> PairedInfo:
        h, w = self.image_size
        names = ("void", *NYU40_CLASSES) if self.keep_void_id else NYU40_CLASSES
        return PairedInfo(("rgb", "depth"), ((3, h, w), (1, h, w)), names)

    @property
    def expected_files(self) -> dict[Any, str]:
        return {MAT_FILES: "images (modality 'rgb') and depths (modality 'depth')"}

    # -- reading ----------------------------------------------------------------------------------

    def read(self, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked ``images (N,3,H,W)`` uint8, ``depths (N,H,W)`` and raw ``labels40
        (N,H,W)``, as views of the stored arrays."""
        path = next(root / name for name in MAT_FILES if (root / name).exists())
        try:
            with _h5py().File(path, "r") as f:
                missing = [key for key in ("images", "depths") if key not in f]
                if missing:
                    raise DataError(f"{path} has no dataset {missing} (keys: {sorted(f)})")
                images, depths = f["images"][()], f["depths"][()]
                labels = f["labels40"][()].transpose(0, 2, 1) if "labels40" in f else None
        except OSError as e:
            raise DataError(f"{path}: not a readable MATLAB v7.3 / HDF5 file ({e})") from None
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"{path}: images have shape {images.shape}, expected (N, 3, W, H)")
        if depths.shape != (len(depths), *images.shape[2:]):
            raise DataError(
                f"{path}: depths have shape {depths.shape}, expected "
                f"(N, {images.shape[2]}, {images.shape[3]}) like the images"
            )
        images, depths = images.transpose(0, 1, 3, 2), depths.transpose(0, 2, 1)
        check_lengths(f"{self.name} in {root}", {"rgb": images, "depth": depths})
        if labels is None:
            labels = self.read_labels40(root, len(images), images.shape[2:])
        where = f"{self.name} in {root}"
        check_lengths(where, {"rgb": images, "depth": depths, "labels40": labels})
        if labels.shape[1:] != images.shape[2:]:
            raise DataError(
                f"{where}: labels40 are {labels.shape[1:]}, images "
                f"{images.shape[2:]} (height, width)"
            )
        return images, depths, labels

    def read_labels40(self, root: Path, n: int, hw: tuple[int, int]) -> np.ndarray:
        if (root / "labels40.mat").exists():
            return read_labels40_mat(root / "labels40.mat", n, hw)
        if (root / "labels40.npy").exists():
            labels = np.load(root / "labels40.npy", mmap_mode="r", allow_pickle=False)
            if labels.shape != (n, *hw):
                raise DataError(
                    f"{root / 'labels40.npy'} has shape {labels.shape}, "
                    f"expected {(n, *hw)} (N, H, W)"
                )
            return labels
        raise MissingDataFileError(
            f"{self.name}: no 40-class labels in {root}: the .mat file has no 'labels40' and "
            "neither labels40.mat nor labels40.npy is next to it. Download labels40.mat from "
            "https://github.com/ankurhanda/nyuv2-meta-data into that directory."
        )

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """``labels40`` -> uint8 class ids with void = 255 (a look-up table, range-checked)."""
        labels = np.asarray(labels)
        lo, hi = (labels.min(), labels.max()) if labels.size else (0, 0)
        if lo < 0 or hi > len(NYU40_CLASSES):
            raise DataError(f"labels40 ids must be 0 (void)..40, found {lo}..{hi}")
        if not np.issubdtype(labels.dtype, np.integer):  # MATLAB may store them as double
            labels = np.rint(labels).astype(np.uint8)
        lut = np.arange(len(NYU40_CLASSES) + 1, dtype=np.uint8)
        if not self.keep_void_id:
            lut -= 1  # 1..40 -> 0..39
        lut[VOID] = IGNORE_INDEX
        # Indexing with the stored integer dtype: an int64 copy of the full masks would be 3.5 GB.
        return lut[labels]

    # -- datasets ---------------------------------------------------------------------------------

    def load_splits(self) -> tuple[PairedDataset, PairedDataset, PairedDataset]:
        root = self.find_root()
        images, depths, labels = self.read(root)
        masks = self.encode(labels)
        # Per-channel extrema over every image, as the repo normalises the whole 4-D array.
        prepare = _Prepare(images.min(axis=(0, 2, 3)), images.max(axis=(0, 2, 3)), self.image_size)
        pairs = PairedDataset(images, depths, masks, prepare, where=f"{self.name} in {root}")
        train, val, test = random_split(len(pairs), self.split_seed, self.split_file)
        return pairs.subset(train), pairs.subset(val), pairs.subset(test)


class _Prepare:
    """One sample's tensors: RGB scaled by the dataset's per-channel extrema, depth min-max
    normalised on its own, both resized with the mask when ``size`` differs (a class rather than
    a closure so that DataLoader workers can unpickle it under any start method)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, size: tuple[int, int]) -> None:
        self.lo = np.asarray(lo, dtype=np.float64)[:, None, None]
        span = np.asarray(hi, dtype=np.float64)[:, None, None] - self.lo
        self.span = np.where(span > 0, span, 1.0)
        self.size = size

    def __call__(self, image: np.ndarray, depth: np.ndarray, mask: np.ndarray):
        rgb = ((image - self.lo) / self.span).astype(np.float32)
        d = min_max(depth)
        if rgb.shape[1:] != self.size:
            rgb = _resize(rgb.transpose(1, 2, 0), self.size).transpose(2, 0, 1)
            d = _resize(d, self.size)
            mask = cv2.resize(
                np.ascontiguousarray(mask), self.size[::-1], interpolation=cv2.INTER_NEAREST
            )
        return as_tensor(rgb), as_tensor(d[None]), torch.from_numpy(mask.astype(np.int64))


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Area interpolation when shrinking (no aliasing), bilinear when enlarging.
    shrink = size[0] < x.shape[0] or size[1] < x.shape[1]
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(x), size[::-1], interpolation=mode)
