"""Shared machinery for kdzoo's semantic-segmentation DataModules.

Every segmentation DataModule follows one contract (kdzoo spec ``segmentation.md`` §5), so that a
LightningCLI config can swap datasets and the segmentation methods (LAD, FST, ...) can rely on it:

- ``num_classes``, ``in_chans`` (3), ``mean``, ``std``, ``class_names`` and ``ignore_index`` (always
  255, the value every converter writes on disk) are valid right after ``__init__``;
- val/test/predict batches are ``(image float32 N x 3 x H x W normalised, mask int64 N x H x W)``
  with class ids ``0..C-1`` and 255 for "ignore"; eval transforms never crop or flip, and resize
  (image bilinear, mask nearest) only when ``eval_size`` is given;
- train batches are random crops: ``(image, mask)``, or, when unlabelled data is configured, a
  dict ``{"labelled": (image, mask), "unlabelled": image_u}`` from Lightning's
  :class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader` in ``"max_size_cycle"``
  mode, so an epoch is as long as the longer loader (the U2PL/FST convention of cycling the
  labelled set to the unlabelled length). ``future_batches=K`` adds ``"future"``: a list of ``K``
  such dicts from further independently shuffled loaders, the extra batches FST-W's virtual
  students consume (Du et al., "Learning from Future: A Novel Self-Training Framework for Semantic
  Segmentation", NeurIPS 2022, arXiv:2209.06993; official code https://github.com/usr922/FST);
- the train pipeline is one albumentations ``Compose`` applied to image and mask together: random
  scale, pad to the crop (image 0, mask 255), random crop, horizontal flip, normalise; its RNG is
  seeded by the classification base's scheme (``ReseedingDataLoader``,
  ``TransformedDataset.seed_item`` of :mod:`kdzoo.datamodules.loading`: item ``j`` of epoch ``e``
  from ``(loader seed, e, j)``), so runs under ``lightning.seed_everything`` see identical
  batches, and a resumed run the batches of the uninterrupted one;
- every mask is checked when it is loaded (size against its image; ids against ``0..C-1`` and
  255), so malformed data fails at the first batch with a :class:`DataError` naming the file.

The datasets, mask checks and split-list helpers live in
:mod:`kdzoo.datamodules.segmentation.dataset`; the public names are re-exported here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from kdzoo.datamodules.image_folder import IMAGENET_MEAN, IMAGENET_STD
from kdzoo.datamodules.segmentation.dataset import (
    IGNORE_INDEX,
    ArrayItems,
    ArraySegmentationDataset,
    FileSegmentationDataset,
    SegItem,
    SegmentationDataset,
    _item_names,
    collate,
    encode_mask,
    read_split_list,
)
from kdzoo.datamodules.skeleton import (
    DatasetNotFoundError,
    KDZooDataModule,
    check_arg,
    check_count,
    seeded_subset,
)
from kdzoo.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "ArrayItems",
    "SegItem",
    "SegmentationDataModule",
    "SegmentationDataset",
    "encode_mask",
    "read_split_list",
]

Size = int | tuple[int, int]


def _pair(name: str, value: Any, allow_none: bool = False) -> tuple[int, int] | None:
    """``int`` or ``[h, w]`` -> ``(h, w)``, checked."""
    if value is None and allow_none:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    ok = len(pair) == 2 and all(isinstance(v, int) and v >= 1 for v in pair)
    accepted = "an integer >= 1 or [height, width]" + (" or None" if allow_none else "")
    check_arg(name, value, ok, accepted)
    return pair


# -- the DataModule -----------------------------------------------------------------------------


class SegmentationDataModule(KDZooDataModule):
    """Base DataModule for semantic segmentation (contract in the module docstring).

    Subclasses set the class attributes describing their data and implement :meth:`load_split`.
    Nothing is ever downloaded.

    Args:
        batch_size: training images per batch (labelled and unlabelled each).
        eval_batch_size: images per val/test/predict batch; keep 1 for datasets whose images
            differ in size unless ``eval_size`` is set.
        crop_size: training crop, an int or ``[height, width]``.
        scale_range: random rescale factor range of the training images (relative to their
            stored size), image bilinear, mask nearest.
        flip: random horizontal flip (p = 0.5) of training images.
        augment: ``False`` disables the random scale and flip (the crop remains, it makes
            batches).
        eval_size: resize eval images (bilinear) and masks (nearest) to this int or
            ``[height, width]``; ``None`` keeps the stored size.
        train_subset: keep this many (seeded random) labelled training items; ``None`` all.
        eval_subset: same for the val and test splits.
        labelled_list: a split file (one id or root-relative image path per line, U2PL/FST
            style): only these training items are labelled.
        unlabelled: serve the training items *not* in ``labelled_list``, without masks, as the
            unlabelled set (semi-supervised training; needs ``labelled_list``).
        future_batches: ``K`` further labelled+unlabelled batches per step under ``"future"``
            (FST-W); needs unlabelled data.
        split_seed: seed of the subsets (and of datasets without an official val split).
        Other arguments (``root``, ``num_workers``): see
            :class:`~kdzoo.datamodules.skeleton.KDZooDataModule`.
    """

    expected_kind = "folders"
    #: What to do about mask ids outside ``0..C-1`` and 255.
    mask_fix: str = ""
    default_class_names: tuple[str, ...] = ()
    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(
        self,
        *,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        crop_size: Size = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        augment: bool = True,
        eval_size: Size | None = None,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        labelled_list: str | None = None,
        unlabelled: bool = False,
        future_batches: int = 0,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        check_count("eval_batch_size", eval_batch_size)
        check_count("split_seed", split_seed, 0)
        check_count("future_batches", future_batches, 0)
        check_count("train_subset", train_subset, optional=True)
        check_count("eval_subset", eval_subset, optional=True)
        scale = tuple(float(s) for s in scale_range)
        ok = len(scale) == 2 and 0 < scale[0] <= scale[1]
        check_arg("scale_range", scale_range, ok, "(low, high) with 0 < low <= high")
        # Plain attributes, not hparams: a subclass may redefine an argument (the mosaics'
        # ``unlabelled`` is a mode), and hparams would then hold the subclass's value.
        self.eval_batch_size = eval_batch_size
        self.crop_size = _pair("crop_size", crop_size)
        self.eval_size = _pair("eval_size", eval_size, allow_none=True)
        self.scale_range = scale
        self.flip, self.augment = flip, augment
        self.train_subset, self.eval_subset = train_subset, eval_subset
        self.split_seed = split_seed
        self.labelled_list = labelled_list
        self.use_unlabelled = unlabelled
        self.future_batches = future_batches
        self.check_unlabelled_args(labelled_list, unlabelled, future_batches)
        self.train_unlabelled: SegmentationDataset | None = None

    def check_unlabelled_args(
        self, labelled_list: str | None, unlabelled: bool, future_batches: int
    ) -> None:
        """Reject inconsistent semi-supervised arguments at construction."""
        if labelled_list is not None and not Path(labelled_list).expanduser().is_file():
            raise DataError(f"labelled_list {labelled_list} does not exist or is not a file")
        if unlabelled and labelled_list is None:
            raise DataError(
                "unlabelled=True needs labelled_list: the training items not listed in it "
                "become the unlabelled set"
            )
        if future_batches and not unlabelled:
            raise DataError(
                f"future_batches={future_batches} needs unlabelled data (FST's future batches "
                "are labelled+unlabelled pairs): set unlabelled=True and labelled_list"
            )

    # -- properties linked to the model by the CLI ---------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.default_class_names)

    @property
    def num_classes(self) -> int:
        return len(self.default_class_names)

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.default_mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.default_std)

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX

    # -- data location -------------------------------------------------------------------------

    def how_to_get(self) -> list[str]:
        hints = super().how_to_get()
        if self.install_hint:  # registration, licences or converters: fetched by hand
            hints[0] += " (kdzoo never downloads it)"
        return hints

    # -- splits --------------------------------------------------------------------------------

    @abstractmethod
    def load_split(self, split: str) -> Sequence[SegItem] | ArrayItems:
        """The items of ``split`` (``"train"``, ``"val"`` or ``"test"``), in a fixed order."""

    def split_labelled(self, train: Any) -> tuple[np.ndarray, tuple[Any, np.ndarray] | None]:
        """Indices of the labelled training items, and the unlabelled ``(items, indices)``.

        Follows ``labelled_list``/``unlabelled``; subclasses with another source of unlabelled
        data (the mosaics' target domain) override this.
        """
        everything = np.arange(len(train))
        if self.labelled_list is None:
            return everything, None
        lookup = {name: i for i, item in enumerate(train) for name in _item_names(item)}
        entries = read_split_list(self.labelled_list)
        unknown = [e for e in entries if e not in lookup]
        if unknown:
            example = train[0]
            raise DataError(
                f"labelled_list {self.labelled_list}: {len(unknown)} of {len(entries)} entries "
                f"match no training item of {self.name} (first: {unknown[:3]}); entries must be "
                f"ids like {example.key!r} or root-relative image paths like "
                f"{example.relpath!r} (is the list for another dataset or split?)"
            )
        labelled = np.unique([lookup[e] for e in entries])
        if not self.use_unlabelled:
            return labelled, None
        rest = np.setdiff1d(everything, labelled)
        if rest.size == 0:
            raise DataError(
                f"labelled_list {self.labelled_list} lists every training item: nothing is "
                "left for the unlabelled set"
            )
        return labelled, (train, rest)

    def make_dataset(
        self, data: Any, indices: np.ndarray, transform: A.Compose, with_masks: bool, rank: int
    ) -> SegmentationDataset:
        kwargs = {
            "with_masks": with_masks,
            "num_classes": self.num_classes,
            "mask_fix": self.mask_fix,
        }
        if isinstance(data, ArrayItems):
            return ArraySegmentationDataset(data, transform, indices, rank, **kwargs)
        return FileSegmentationDataset(data, transform, indices, rank, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:  # datasets do not depend on the stage: build them once
            return
        rank = self.global_rank
        train = self.load_split("train")
        labelled, unlabelled = self.split_labelled(train)
        labelled = seeded_subset(labelled, self.train_subset, self.split_seed, 1)
        # Every dataset gets its own Compose: they must not share one RNG.
        self.train = self.make_dataset(train, labelled, self.train_transform(), True, rank)
        if unlabelled is not None:
            data, indices = unlabelled
            tf = self.train_transform()
            self.train_unlabelled = self.make_dataset(data, indices, tf, False, rank)
        for split, stream in (("val", 2), ("test", 3)):
            data = self.load_split(split)
            indices = seeded_subset(np.arange(len(data)), self.eval_subset, self.split_seed, stream)
            dataset = self.make_dataset(data, indices, self.eval_transform(), True, rank)
            setattr(self, split, dataset)
        self.predict = self.test

    # -- transforms ----------------------------------------------------------------------------

    def _finish(self, spatial: list[A.BasicTransform]) -> A.Compose:
        return A.Compose(
            [
                *spatial,
                A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
                ToTensorV2(),
            ]
        )

    def train_transform(self) -> A.Compose:
        """Random scale, pad (image 0, mask ignore), random crop, flip; image and mask jointly."""
        height, width = self.crop_size
        low, high = self.scale_range
        spatial: list[A.BasicTransform] = []
        if self.augment and (low, high) != (1.0, 1.0):
            spatial.append(
                A.RandomScale(
                    scale_limit=(low - 1.0, high - 1.0),  # albumentations adds 1
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
            )
        spatial += [
            # Pad at the bottom/right like mmseg and CIRKD. The image is padded with black before
            # normalisation (as CIRKD/LAD; mmseg pads with 0 after it, i.e. the mean colour);
            # the mask with ignore, so the loss never sees the padding.
            A.PadIfNeeded(
                height,
                width,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height, width),
        ]
        if self.augment and self.flip:
            spatial.append(A.HorizontalFlip(p=0.5))
        return self._finish(spatial)

    def eval_transform(self) -> A.Compose:
        """No crop or flip; resize (image bilinear, mask nearest) only with ``eval_size``."""
        if self.eval_size is None:
            return self._finish([])
        height, width = self.eval_size
        resize = A.Resize(
            height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST
        )
        return self._finish([resize])

    # -- loaders -------------------------------------------------------------------------------

    def loader(self, dataset: Any, train: bool = False, **kwargs: Any) -> DataLoader:
        kwargs.setdefault("batch_size", self.batch_size if train else self.eval_batch_size)
        # A last batch of one image breaks BatchNorm in pooled heads (DeepLabV3's ASPP).
        return super().loader(dataset, train, collate_fn=collate, drop_last=train, **kwargs)

    def _train_loader(self, dataset: SegmentationDataset, fresh: bool) -> DataLoader:
        if len(dataset) < self.batch_size:
            raise DataError(
                f"{self.name}: {len(dataset)} training items, fewer than batch_size="
                f"{self.batch_size} (the last incomplete batch is dropped): lower batch_size"
            )
        if fresh:  # an independent augmentation stream over the same items
            dataset = dataset.with_transform(self.train_transform())
        return self.loader(dataset, train=True)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        labelled = self.require_setup(self.train)
        if self.train_unlabelled is None:
            return self._train_loader(labelled, fresh=False)

        def pair(fresh: bool) -> dict[str, DataLoader]:
            return {
                "labelled": self._train_loader(labelled, fresh),
                "unlabelled": self._train_loader(self.train_unlabelled, fresh),
            }

        iterables: dict[str, Any] = pair(fresh=False)
        if self.future_batches:
            iterables["future"] = [pair(fresh=True) for _ in range(self.future_batches)]
        return CombinedLoader(iterables, mode="max_size_cycle")


def missing_split(root: Path, folder: str, pattern: str) -> DatasetNotFoundError:
    """The error for a dataset root that exists but holds no images of one split."""
    return DatasetNotFoundError(f"{root / folder}: no images matching {pattern}")
