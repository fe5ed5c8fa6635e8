"""Shared machinery for kdzoo's image-classification DataModules.

Every DataModule here follows one contract so that a LightningCLI config can swap datasets:

- the properties the CLI links to the model (``num_classes``, ``in_chans``, ``mean``, ``std``,
  ``image_size``, ``class_names``) are valid right after ``__init__``, before ``setup()``;
- the dataset root is resolved by the skeleton all kdzoo DataModules share
  (:class:`~kdzoo.datamodules.skeleton.KDZooDataModule`: the argument if given, else
  ``$KDZOO_DATA/<subdir>``, the download cache, known system locations) and a missing dataset raises
  :class:`DatasetNotFoundError` saying where kdzoo looked and how to get the data;
- downloads happen only in ``prepare_data()`` and only with ``download=True``;
- ``setup()`` splits the official train set into train/val with its own seeded generator, so the
  split never depends on (or disturbs) the global RNG;
- augmentations are albumentations pipelines; through a :class:`ReseedingDataLoader`, the order of
  epoch ``e`` is a function of ``(loader seed, e)`` and the augmentation of item ``j`` in epoch
  ``e`` a function of ``(loader seed, e, j)`` only, whatever the number of worker processes or
  ranks (of ``(augment_seed, e, j)`` only with ``augment_seed``, which also adds the sample ids
  to the training batches). The loader seed is drawn from torch's RNG when the loader is built,
  so runs under ``lightning.seed_everything`` are bit-identical on CPU, and nothing the loaders
  do consumes the global RNG: a run resumed at an epoch boundary (see
  :mod:`kdzoo.checkpointing`) sees the same batches as the run that was never interrupted.
"""

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2

from kdzoo.datamodules.loading import (
    ArrayDataset,
    ReseedingDataLoader,
    TransformedDataset,
    loader_start,
    seed_worker,
)
from kdzoo.datamodules.skeleton import (
    LINKED_DATA_ATTRIBUTES,
    DatasetNotFoundError,
    KDZooDataModule,
    check_arg,
    check_choice,
    check_count,
    check_fraction,
    holdout_split,
    resolve_root,
    seeded_subset,
)
from kdzoo.errors import DataError

# The loading and skeleton names are re-exported for the callers that import them from here.
__all__ = [
    "LINKED_DATA_ATTRIBUTES",
    "DataError",
    "DatasetNotFoundError",
    "ImageClassificationDataModule",
    "PredictSplit",
    "ReseedingDataLoader",
    "TransformedDataset",
    "Transforms",
    "loader_start",
    "resolve_root",
    "seed_worker",
]

Transforms = Sequence[A.BasicTransform | A.BaseCompose] | A.BaseCompose
PredictSplit = Literal["test", "val", "train"]


class ImageClassificationDataModule(KDZooDataModule):
    """Base DataModule: batches are ``(float32 images N x C x H x W normalised, int64 targets)``
    (training batches ``(images, targets, int64 sample ids)`` with ``augment_seed``).

    Subclasses set the class attributes describing their data and implement :meth:`load_data`,
    :meth:`train_transforms` and :meth:`eval_transforms`.

    Args:
        val_fraction: share of the official train set held out for validation, in [0, 1).
        split_seed: seed of the train/val split and of the subsets.
        image_size: side length fed to the model; ``None`` keeps the native size.
        grey_to_rgb: replicate single-channel images to 3 channels (e.g. for RGB teachers).
        augment: use the training augmentations (``False`` trains on eval transforms).
        train_subset: keep only this many (seeded random) training items; ``None`` keeps all.
        eval_subset: same for the val and test splits.
        download: let ``prepare_data()`` download missing data (where the dataset supports it).
        classes: keep only the samples of these classes (dataset class indices), in every split,
            and relabel them ``0..k-1`` in the order given; ``num_classes`` is then ``k`` and
            ``class_names`` the selected names. The train/val split is drawn before the
            selection, so held-out images stay held out whatever the selection (the
            specialists of Knowledge Concentration train on a vertical this way); the subsets
            are drawn after it. ``None`` keeps every class.
        predict_split: the split ``kdzoo predict`` runs over: ``"test"``, ``"val"`` or
            ``"train"`` (with the eval transforms, never the augmentations).
        augment_seed: seed of the training augmentation for exact replay, distinct from the
            training seed; with it, the training view of sample ``i`` in epoch ``e`` is a
            deterministic function of ``(augment_seed, e, i)`` only, independent of worker
            count, batch size, sample order, DDP world size and rank, and training batches
            carry the sample ids as a third element ``(images, targets, ids)``; needed by a
            teacher-output cache (``kdzoo cache``). ``None`` (the default) augments from the
            loader seed (see :mod:`kdzoo.datamodules.loading`) and batches are
            ``(images, targets)``. Only the training split is affected.
        Other arguments (``root``, ``batch_size``, ``num_workers``): see
            :class:`~kdzoo.datamodules.skeleton.KDZooDataModule`.
    """

    native_chans: int = 1
    native_size: int | None = None
    native_mean: tuple[float, ...] = ()
    native_std: tuple[float, ...] = ()
    default_class_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int | None = None,
        grey_to_rgb: bool = False,
        augment: bool = True,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        download: bool = False,
        classes: list[int] | None = None,
        predict_split: PredictSplit = "test",
        augment_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fraction("val_fraction", val_fraction, zero_ok=True)
        check_count("split_seed", split_seed, 0)
        check_arg("image_size", image_size, image_size is None or image_size >= 1, "None or >= 1")
        check_count("train_subset", train_subset, optional=True)
        check_count("eval_subset", eval_subset, optional=True)
        check_count("augment_seed", augment_seed, 0, optional=True)
        # From Python, a misspelt split would fail only in setup(), as a bare KeyError.
        check_choice("predict_split", predict_split, PredictSplit)
        self.allow_download = download
        self.image_size: int = image_size if image_size is not None else self.native_size
        if self.image_size is None:
            raise DataError(f"{type(self).__name__} needs an explicit image_size")
        self._class_names: tuple[str, ...] = self.default_class_names
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None:
            self._check_classes()

    # -- properties linked to the model by the CLI ------------------------------------------------

    @property
    def _replicate(self) -> bool:
        # grey_to_rgb is a no-op on data that is already 3-channel.
        return self.hparams.grey_to_rgb and self.native_chans == 1

    @property
    def in_chans(self) -> int:
        return 3 if self._replicate else self.native_chans

    @property
    def mean(self) -> tuple[float, ...]:
        return self.native_mean * 3 if self._replicate else self.native_mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.native_std * 3 if self._replicate else self.native_std

    @property
    def class_names(self) -> list[str] | None:
        names = self._class_names
        if self.classes is not None and names:
            names = tuple(names[c] for c in self.classes)
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else len(self._class_names)

    def _check_classes(self) -> None:
        classes, total = self.classes, len(self._class_names)
        duplicated = sorted({c for c in classes if classes.count(c) > 1})
        out_of_range = sorted({c for c in classes if not 0 <= c < total})
        problems = [] if classes else ["no class given"]
        if duplicated:
            problems.append(f"duplicated {duplicated}")
        if out_of_range:
            problems.append(f"out of range {out_of_range}")
        if problems:
            raise DataError(
                f"classes={classes}: {', '.join(problems)}; list each wanted class of {self.name} "
                f"once, from 0..{total - 1}, or leave classes unset to keep all {total}"
            )

    def select_classes(self, targets: np.ndarray) -> np.ndarray:
        """``targets`` relabelled to their position in ``classes``; -1 for the classes left out."""
        lookup = np.full(len(self._class_names), -1, dtype=np.int64)
        lookup[self.classes] = np.arange(len(self.classes))
        return lookup[targets]

    # -- datasets ---------------------------------------------------------------------------------

    @abstractmethod
    def load_data(self) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """Return ``((train_items, train_targets), (test_items, test_targets))`` of the official
        splits; items are what :meth:`make_dataset` accepts. Must never download."""

    def make_dataset(
        self, items: Any, targets: Any, indices: np.ndarray, transform: A.Compose, rank: int
    ) -> TransformedDataset:
        return ArrayDataset(items, targets, transform, indices, rank)

    def split_train_val(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Seeded random split of the official train set into ``(train, val)`` indices."""
        return holdout_split(len(targets), self.hparams.val_fraction, self.hparams.split_seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:  # datasets do not depend on the stage: build them once
            return
        (train_items, train_targets), (test_items, test_targets) = self.load_data()
        train_targets, test_targets = np.asarray(train_targets), np.asarray(test_targets)
        train_idx, val_idx = self.split_train_val(train_targets)
        test_idx = np.arange(len(test_targets))
        if self.classes is not None:  # after the split, so val holds the same images as without
            self._check_classes()  # again: load_data may have read the class names from disk
            train_targets, test_targets = map(self.select_classes, (train_targets, test_targets))
            train_idx, val_idx = (idx[train_targets[idx] >= 0] for idx in (train_idx, val_idx))
            test_idx = test_idx[test_targets >= 0]
        seed = self.hparams.split_seed
        train_idx = seeded_subset(train_idx, self.hparams.train_subset, seed, 1)
        val_idx = seeded_subset(val_idx, self.hparams.eval_subset, seed, 2)
        test_idx = seeded_subset(test_idx, self.hparams.eval_subset, seed, 3)

        rank = self.global_rank
        train_tf = self.build_transform(train=self.hparams.augment)
        self.train = self.make_dataset(train_items, train_targets, train_idx, train_tf, rank)
        if self.hparams.augment_seed is not None:
            self.train.augment_seed = int(self.hparams.augment_seed)
        # Each dataset gets its own Compose: they must not share one RNG.
        val_tf, test_tf = self.build_transform(train=False), self.build_transform(train=False)
        self.val = self.make_dataset(train_items, train_targets, val_idx, val_tf, rank)
        self.test = self.make_dataset(test_items, test_targets, test_idx, test_tf, rank)
        if self.hparams.predict_split == "train":  # eval transforms: predictions never augment
            tf = self.build_transform(train=False)
            self.predict = self.make_dataset(train_items, train_targets, train_idx, tf, rank)
        else:
            self.predict = {"test": self.test, "val": self.val}[self.hparams.predict_split]

    # -- transforms -------------------------------------------------------------------------------

    @abstractmethod
    def train_transforms(self) -> Transforms:
        """Spatial training augmentations on uint8 ``H x W x C`` images, ending at image_size."""

    @abstractmethod
    def eval_transforms(self) -> Transforms:
        """Deterministic spatial transforms on uint8 images, ending at image_size."""

    def resize(self) -> list[A.BasicTransform]:
        """A resize to ``image_size`` when it differs from the native size, else nothing."""
        if self.image_size == self.native_size:
            return []
        return [A.Resize(self.image_size, self.image_size)]

    def build_transform(self, train: bool) -> A.Compose:
        """Spatial transforms + channel replication + normalisation + tensor conversion."""
        spatial = self.train_transforms() if train else self.eval_transforms()
        spatial = [spatial] if isinstance(spatial, A.BaseCompose) else list(spatial)
        # Replicate on the uint8 H x W x 1 array, before Normalize, which then uses the
        # replicated mean/std.
        channels = [A.ToRGB(num_output_channels=3)] if self._replicate else []
        return A.Compose(
            [
                *spatial,
                *channels,
                A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
                ToTensorV2(),
            ]
        )
