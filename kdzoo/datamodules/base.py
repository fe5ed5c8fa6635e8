"""Shared machinery for kdzoo's image-classification DataModules.

Every DataModule here follows one contract so that a LightningCLI config can swap datasets:

- the properties the CLI links to the model (``num_classes``, ``in_chans``, ``mean``, ``std``,
  ``image_size``, ``class_names``) are valid right after ``__init__``, before ``setup()``;
- the dataset root is resolved by :func:`resolve_root` (the argument if given, else
  ``$KDZOO_DATA/<subdir>``, the download cache, known system locations) and a missing dataset raises
  :class:`DatasetNotFoundError` saying where kdzoo looked and how to get the data;
- downloads happen only in ``prepare_data()`` and only with ``download=True``;
- ``setup()`` splits the official train set into train/val with its own seeded generator, so the
  split never depends on (or disturbs) the global RNG;
- augmentations are albumentations pipelines; through a :class:`ReseedingDataLoader`, the order of
  epoch ``e`` is a function of ``(loader seed, e)`` and the augmentation of item ``j`` in epoch
  ``e`` a function of ``(loader seed, e, j)`` only, whatever the number of worker processes or
  ranks. The loader seed is drawn from torch's RNG when the loader is built, so runs under
  ``lightning.seed_everything`` are bit-identical on CPU, and nothing the loaders do consumes the
  global RNG: a run resumed at an epoch boundary (see :mod:`kdzoo.checkpointing`) sees the same
  batches as the run that was never interrupted.
"""

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
from albumentations.pytorch import ToTensorV2
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader

from kdzoo.datamodules.loading import (
    ArrayDataset,
    ReseedingDataLoader,
    TransformedDataset,
    loader_start,
    seed_worker,
)
from kdzoo.errors import DataError, KDZooError

Transforms = Sequence[A.BasicTransform | A.BaseCompose] | A.BaseCompose
# One expected file, or a tuple of acceptable alternatives (e.g. plain or gzipped).
Expected = str | tuple[str, ...]


class DatasetNotFoundError(KDZooError, FileNotFoundError):
    """A dataset's files are in none of the directories kdzoo looked in."""


def _describe(item: Expected) -> str:
    return item if isinstance(item, str) else " or ".join(item)


def _has(directory: Path, item: Expected) -> bool:
    names = (item,) if isinstance(item, str) else item
    return any((directory / name).exists() for name in names)


def resolve_root(
    dataset: str,
    root: str | os.PathLike | None,
    subdir: str,
    expected: Sequence[Expected],
    *,
    layouts: Sequence[str] = ("",),
    system_dirs: Sequence[str | os.PathLike] = (),
    how_to_get: Sequence[str] = (),
) -> Path:
    """Return the first directory that holds every ``expected`` file.

    An explicit ``root`` is the only place searched: an argument the user typed is never silently
    replaced by another copy of the data. Without it, the base directories are tried in this order:
    ``$KDZOO_DATA/<subdir>``, ``~/.cache/kdzoo/data/<subdir>`` (where ``download=True`` puts data
    when neither is set), then ``system_dirs``. Under each base, every entry of ``layouts`` (a
    relative path, ``""`` for the base itself) is tried, so one dataset can accept e.g. both flat
    files and torchvision's ``FashionMNIST/raw`` layout.

    Raises:
        DatasetNotFoundError: naming ``dataset``, every directory tried, the expected files and the
            ``how_to_get`` hints.
    """
    bases: list[Path] = []
    skipped = None
    env = os.environ.get("KDZOO_DATA")
    if root is not None:
        bases.append(Path(root).expanduser())
    else:
        if env:
            bases.append(Path(env).expanduser() / subdir)
        else:
            skipped = f"$KDZOO_DATA/{subdir} (skipped: $KDZOO_DATA is not set)"
        bases.append(default_cache_dir(subdir))
        bases.extend(Path(d) for d in system_dirs)

    tried: list[Path] = []
    for base in bases:
        for layout in layouts:
            directory = base / layout if layout else base
            if directory in tried:
                continue
            tried.append(directory)
            if all(_has(directory, item) for item in expected):
                return directory

    lines = [f"{dataset} not found. Looked in:"]
    lines += [f"  - {d}" for d in tried]
    if skipped:
        lines.append(f"  - {skipped}")
    lines.append("Expected files: " + ", ".join(_describe(item) for item in expected) + ".")
    if how_to_get:
        lines.append("To get it: " + "; or ".join(how_to_get) + ".")
    raise DatasetNotFoundError("\n".join(lines))


def default_cache_dir(subdir: str) -> Path:
    """Where ``download=True`` stores data when neither ``root`` nor ``$KDZOO_DATA`` is set."""
    return Path.home() / ".cache" / "kdzoo" / "data" / subdir


def _check(name: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise DataError(f"{name} must be {accepted}, got {value!r}")


#: The DataModule properties the ``kdzoo`` command passes to the model's arguments of the same
#: name (a DataModule without one of them simply does not link it).
LINKED_DATA_ATTRIBUTES = ("num_classes", "in_chans", "mean", "std", "modality_shapes")


class ResolvedHparamsMixin:
    """Log the resolved value of each argument that the ``kdzoo`` command links into the model.

    An argument such as ``mean=None`` (the dataset's default) or ``in_chans=1`` with
    ``grey_to_rgb`` resolves to another value, which the model receives. Lightning merges the
    DataModule's and the model's ``hparams_initial`` before logging them and refuses shared keys
    whose values differ, so the logged record holds the resolved values. ``hparams`` keeps the
    arguments as given, so a DataModule saved in a checkpoint is rebuilt as it was configured.
    """

    @property
    def hparams_initial(self) -> AttributeDict:
        hparams = super().hparams_initial
        for key in LINKED_DATA_ATTRIBUTES:
            if key in hparams:
                hparams[key] = getattr(self, key)
        return hparams


class ImageClassificationDataModule(ResolvedHparamsMixin, L.LightningDataModule, ABC):
    """Base DataModule: batches are ``(float32 images N x C x H x W normalised, int64 targets)``.

    Subclasses set the class attributes describing their data and implement :meth:`load_data`,
    :meth:`train_transforms` and :meth:`eval_transforms`.

    Args:
        root: directory holding the data (the only place searched when given); ``None`` searches
            ``$KDZOO_DATA/<subdir>``, the download cache and known system locations (see
            :func:`resolve_root`).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes (0 loads in the main process).
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
    """

    name: str = "dataset"
    #: ``$KDZOO_DATA/<data_subdir>`` and ``~/.cache/kdzoo/data/<data_subdir>`` are searched.
    data_subdir: str = ""
    layouts: tuple[str, ...] = ("",)
    system_dirs: tuple[str, ...] = ()
    expected_files: tuple[Expected, ...] = ()
    install_hint: str | None = None
    can_download: bool = False

    native_chans: int = 1
    native_size: int | None = None
    native_mean: tuple[float, ...] = ()
    native_std: tuple[float, ...] = ()
    default_class_names: tuple[str, ...] = ()

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int | None = None,
        grey_to_rgb: bool = False,
        augment: bool = True,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        download: bool = False,
        classes: list[int] | None = None,
        predict_split: Literal["test", "val", "train"] = "test",
    ) -> None:
        super().__init__()
        _check("batch_size", batch_size, batch_size >= 1, "an integer >= 1")
        _check("num_workers", num_workers, num_workers >= 0, "an integer >= 0")
        _check("val_fraction", val_fraction, 0.0 <= val_fraction < 1.0, "in [0, 1)")
        _check("split_seed", split_seed, split_seed >= 0, "an integer >= 0")
        _check("image_size", image_size, image_size is None or image_size >= 1, "None or >= 1")
        for arg, value in (("train_subset", train_subset), ("eval_subset", eval_subset)):
            _check(arg, value, value is None or value >= 1, "None or an integer >= 1")
        self.save_hyperparameters()
        self.root = root
        self.image_size: int = image_size if image_size is not None else self.native_size
        if self.image_size is None:
            raise DataError(f"{type(self).__name__} needs an explicit image_size")
        self._class_names: tuple[str, ...] = self.default_class_names
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None:
            self._check_classes()
        self.train: TransformedDataset | None = None
        self.val: TransformedDataset | None = None
        self.test: TransformedDataset | None = None
        self.predict: TransformedDataset | None = None

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

    # -- data location ----------------------------------------------------------------------------

    def download_dir(self) -> Path:
        """Where ``prepare_data()`` downloads to: ``root``, else ``$KDZOO_DATA/<subdir>``, else
        the user cache."""
        if self.root is not None:
            return Path(self.root).expanduser()
        env = os.environ.get("KDZOO_DATA")
        if env:
            return Path(env).expanduser() / self.data_subdir
        return default_cache_dir(self.data_subdir)

    def how_to_get(self) -> list[str]:
        hints = []
        if self.install_hint:
            # An explicit root is the only place searched, so it must be dropped to use the
            # system copy.
            unset = " and leave --data.root unset" if self.root is not None else ""
            hints.append(self.install_hint + unset)
        places = " or ".join(f"DIR/{layout}" if layout else "DIR" for layout in self.layouts)
        hints.append(f"pass --data.root DIR where {places} holds these files")
        if self.can_download:
            hints.append(
                "pass --data.download true to let torchvision download it into "
                f"{self.download_dir()}"
            )
        return hints

    def find_root(self) -> Path:
        """The directory holding this dataset's files (raises :class:`DatasetNotFoundError`)."""
        return resolve_root(
            self.name,
            self.root,
            self.data_subdir,
            self.expected_files,
            layouts=self.layouts,
            system_dirs=self.system_dirs,
            how_to_get=self.how_to_get(),
        )

    def download(self, directory: Path) -> None:
        """Download the dataset into ``directory`` (subclasses with ``can_download``)."""
        raise DataError(f"kdzoo cannot download {self.name}: {'; '.join(self.how_to_get())}")

    def prepare_data(self) -> None:
        """Check the data is present, downloading it first if missing and ``download=True``."""
        try:
            self.find_root()
        except DatasetNotFoundError:
            if not (self.hparams.download and self.can_download):
                raise
            directory = self.download_dir()
            directory.mkdir(parents=True, exist_ok=True)
            self.download(directory)
            self.find_root()

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
        n = len(targets)
        n_val = round(n * self.hparams.val_fraction)
        if n_val >= n:
            raise DataError(f"val_fraction={self.hparams.val_fraction} leaves no training data")
        perm = np.random.default_rng(self.hparams.split_seed).permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def _subset(self, indices: np.ndarray, size: int | None, stream: int) -> np.ndarray:
        if size is None or size >= len(indices):
            return indices
        # A generator per split (``stream``) so e.g. the val subset does not change with
        # train_subset.
        rng = np.random.default_rng([self.hparams.split_seed, stream])
        return np.sort(rng.permutation(indices)[:size])

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
        train_idx = self._subset(train_idx, self.hparams.train_subset, 1)
        val_idx = self._subset(val_idx, self.hparams.eval_subset, 2)
        test_idx = self._subset(test_idx, self.hparams.eval_subset, 3)

        rank = self.trainer.global_rank if self.trainer is not None else 0
        train_tf = self.build_transform(train=self.hparams.augment)
        self.train = self.make_dataset(train_items, train_targets, train_idx, train_tf, rank)
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

    # -- loaders ----------------------------------------------------------------------------------

    def _loader(self, dataset: TransformedDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        return ReseedingDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            drop_last=False,
            **loader_start(self.trainer, train=shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict, shuffle=False)
