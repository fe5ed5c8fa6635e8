"""Shared machinery for kdzoo's paired-modality DataModules (cross-modal distillation data).

Cross-modal distillation trains on samples with two modalities and a label; the student sees one
of them at test time (Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal
Knowledge Distillation", ACM MM 2025, arXiv:2507.07015; official code
https://github.com/Gray-OREO/MST-Distill, whose data handling these modules follow where noted).
Every paired DataModule follows one contract, so the cross-modal methods can be written against it:

- batches are tuples ``(x_m1, x_m2, y)``: float32 tensors per modality, image-like
  ``(N, C, H, W)`` or vectors ``(N, D)``; ``y`` is int64, class ids ``(N,)`` when
  ``task == "classification"``, or masks ``(N, H, W)`` with ``ignore_index`` (255) for void pixels
  when ``task == "segmentation"``. With ``augment_seed`` set, training batches carry the int64
  sample ids as a fourth item, ``(x_m1, x_m2, y, ids)`` (for a teacher-output cache, see
  :class:`PairedModalityDataModule`);
- ``num_classes``, ``modalities`` (two names), ``modality_shapes`` (per-sample shapes),
  ``class_names``, ``task`` and ``ignore_index`` are valid right after ``__init__``;
- datasets without official splits use the repo's seeded random 60/20/20 train/val/test split of
  all samples (``utils.get_indices``: a permutation cut at ``int(0.6 N)`` and ``int(0.8 N)``),
  drawn from ``split_seed`` or read from one of the repo's ``metadata/<db>_indices.csv`` files;
  datasets with official splits hold ``val_fraction`` of the official train part out instead;
- nothing is downloaded; a missing dataset raises
  :class:`~kdzoo.datamodules.skeleton.DatasetNotFoundError` saying where kdzoo looked and how to get
  the data, and a dataset missing only some files raises :class:`MissingDataFileError` naming
  them; malformed files (mismatched lengths, bad shapes) raise
  :class:`~kdzoo.errors.DataError`.
"""

from __future__ import annotations

import csv
import os
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdzoo.datamodules.skeleton import (
    DatasetNotFoundError,
    Expected,
    KDZooDataModule,
    check_count,
    has_file,
    seeded_subset,
)
from kdzoo.errors import DataError

#: Where MST-Distill cuts its permutation into train / val / test (60/20/20) for datasets
#: without official splits; the literals of its ``utils.get_indices`` (0.6 + 0.2 != 0.8 in floats).
SPLIT_CUTS = (0.6, 0.8)

Item = tuple[torch.Tensor, torch.Tensor, Any]
#: ``prepare(x_m1, x_m2, y)`` turns one stored sample into the tensors of one batch item.
Prepare = Callable[[Any, Any, Any], Item]


class MissingDataFileError(DataError, DatasetNotFoundError):
    """Some, not all, of a dataset's files are present (e.g. one modality is missing)."""


@dataclass(frozen=True)
class PairedInfo:
    """What the CLI and the methods need to know about a paired dataset before ``setup()``."""

    modalities: tuple[str, str]
    modality_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    class_names: tuple[str, ...]


# -- array helpers ------------------------------------------------------------------------------


def min_max(x: Any, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``(x - min) / (max - min)`` over ``axis`` (all of ``x`` for ``None``), as float32.

    MST-Distill's ``utils.min_max_normalize`` divides by ``max - min`` unguarded; a constant slice
    (e.g. an all-zero depth map) would give NaN there, here it gives zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    span = hi - lo
    out = (x - lo) / np.where(span > 0, span, 1.0)
    return out.astype(np.float32)


def load_npy(path: Path, what: str) -> np.ndarray:
    """``np.load`` memory-mapped (large modalities are read item by item), errors as DataError."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise MissingDataFileError(f"{path} ({what}) is missing") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path} ({what}): not a readable .npy array ({e})") from None


def check_labels(labels: Any, num_classes: int | None, where: str) -> np.ndarray:
    """1-D integral class ids (integer or integral float dtype) as int64, range-checked."""
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.number) and y.dtype != np.bool_):
        raise DataError(
            f"{where}: labels must be a 1-D array of class ids, got {y.dtype} {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise DataError(f"{where}: labels must be integer class ids, got non-integral {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        top = "" if num_classes is None else f"..{num_classes - 1}"
        raise DataError(f"{where}: labels range {y.min()}..{y.max()}, expected 0{top}")
    return y


def check_lengths(where: str, arrays: dict[str, Any]) -> int:
    """The common length of the named ``arrays``; a mismatch is a DataError naming each length."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n} items" for name, n in lengths.items())
        raise DataError(
            f"{where}: mismatched pair lengths: {listed}; every sample needs both "
            "modalities and a label, in the same order"
        )
    return next(iter(lengths.values()))


# -- splits -------------------------------------------------------------------------------------


def read_permutation(path: str | os.PathLike, column: str, n: int) -> np.ndarray:
    """Column ``column`` of an MST-Distill ``metadata/<db>_indices.csv``: a permutation of ``n``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DataError(f"split_file {path}: cannot read it ({e})") from None
    header = rows[0] if rows else []
    if column not in header:
        raise DataError(f"split_file {path} has no column {column!r} (columns: {header[:4]}...)")
    k = header.index(column)
    try:
        perm = np.array([int(row[k]) for row in rows[1:]], dtype=np.int64)
    except (ValueError, IndexError):
        raise DataError(f"split_file {path}: column {column!r} is not a list of integers") from None
    if not np.array_equal(np.sort(perm), np.arange(n)):
        raise DataError(
            f"split_file {path}: column {column!r} is not a permutation of the {n} samples "
            f"({len(perm)} entries); is it the file of this dataset?"
        )
    return perm


def random_split(
    n: int, seed: int, split_file: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MST-Distill's 60/20/20 split: sorted ``(train, val, test)`` indices of ``n`` samples.

    The permutation is ``np.random.default_rng(seed).permutation(n)``, or column
    ``group_<seed>`` of ``split_file`` (the repo's own CSV, which reproduces its splits exactly);
    it is cut at ``int(0.6 n)`` and ``int(0.8 n)`` as in the repo's ``utils.get_indices``.
    """
    if split_file is not None:
        perm = read_permutation(split_file, f"group_{seed}", n)
    else:
        perm = np.random.default_rng(seed).permutation(n)
    a, b = int(n * SPLIT_CUTS[0]), int(n * SPLIT_CUTS[1])
    if a == 0 or b in (a, n):
        raise DataError(f"{n} samples are too few for a 60/20/20 train/val/test split")
    return np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:])


# -- dataset ------------------------------------------------------------------------------------


class PairedDataset(Dataset):
    """Items ``prepare(m1[j], m2[j], labels[j])`` for ``j`` in ``indices``.

    ``m1``, ``m2`` and ``labels`` only need ``len`` and integer indexing, so memory-mapped
    ``.npy`` files and lazy views work; their lengths are checked to agree.

    With :attr:`augment_seed` set (:meth:`replayable`), items carry their sample id ``j`` as a
    fourth element and :meth:`view` gives the item of any epoch, the interface of
    :class:`~kdzoo.datamodules.loading.TransformedDataset` that a teacher-output cache reads.
    """

    #: Set by :meth:`replayable`: items are ``(x_m1, x_m2, y, j)``. Nothing here is augmented,
    #: so the seed changes no item; it is kept (and recorded in a cache's manifest) so that paired
    #: and classification data have one exact-replay interface.
    augment_seed: int | None = None

    def __init__(
        self, m1: Any, m2: Any, labels: Any, prepare: Prepare, indices: Any = None, where: str = ""
    ) -> None:
        n = check_lengths(where or "paired data", {"m1": m1, "m2": m2, "labels": labels})
        self.m1, self.m2, self.labels, self.prepare = m1, m2, labels, prepare
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)

    def subset(self, indices: np.ndarray) -> PairedDataset:
        """The same data viewed through other ``indices`` (positions in the underlying arrays)."""
        subset = PairedDataset(self.m1, self.m2, self.labels, self.prepare, indices)
        subset.augment_seed = self.augment_seed
        return subset

    def replayable(self, augment_seed: int) -> PairedDataset:
        """The same items, each with its sample id (a new dataset: this one is left as it is)."""
        replay = self.subset(self.indices)
        replay.augment_seed = int(augment_seed)
        return replay

    @property
    def sample_ids(self) -> np.ndarray:
        """The sample id of each item: its position in the underlying arrays (stable under the
        split and the subsets); the ids training batches carry with :attr:`augment_seed`."""
        return self.indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item | tuple[torch.Tensor, torch.Tensor, Any, int]:
        j = int(self.indices[i])
        item = self.prepare(self.m1[j], self.m2[j], self.labels[j])
        return item if self.augment_seed is None else (*item, j)

    def view(self, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
        """``(x_m1, x_m2, y, sample id)`` of item ``i`` as training reads it in ``epoch``: the same
        item in every epoch, since paired data is not augmented.

        Raises:
            DataError: if :attr:`augment_seed` is not set (the items then carry no ids).
        """
        if self.augment_seed is None:
            raise DataError(
                f"{type(self).__name__}.view needs augment_seed: set "
                "--data.init_args.augment_seed so that training items carry their sample ids"
            )
        return self[i]


def as_tensor(x: Any) -> torch.Tensor:
    """A contiguous float32 tensor of ``x`` (copied, so memory maps are never handed out)."""
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True, order="C"))


# -- the DataModule -----------------------------------------------------------------------------


class PairedModalityDataModule(KDZooDataModule):
    """Base DataModule for two-modality data; the batch contract is in the module docstring.

    Subclasses set the class attributes describing their data and implement :meth:`describe`
    (modalities, per-sample shapes, class names), :attr:`expected_files` and :meth:`load_splits`.
    Nothing is ever downloaded.

    Args:
        split_seed: seed of the train/val(/test) split and of the subsets.
        train_subset: keep only this many (seeded random) training samples; ``None`` keeps all.
        eval_subset: same for the val and test splits.
        augment_seed: the argument of the image-classification datamodules, so that a
            teacher-output cache (``kdzoo cache``) has one interface. Paired data is not
            augmented, so it changes no item: the training item of sample ``i`` is the same in
            every epoch whatever the seed. Set, training batches carry the sample ids as a fourth
            item ``(x_m1, x_m2, y, ids)`` (ids: positions in the underlying arrays, stable under
            the split and the subsets) and the training dataset gives the item of any epoch
            (:meth:`PairedDataset.view`); a cache records the seed and a run reading it must set
            the same one. ``None`` (the default): batches ``(x_m1, x_m2, y)``, as without the
            argument. Only the training split is affected.
        Other arguments (``root``, ``batch_size``, ``num_workers``): see
            :class:`~kdzoo.datamodules.skeleton.KDZooDataModule`.
    """

    name: str = "paired dataset"
    task: str = "classification"
    ignore_index: int | None = None

    def __init__(
        self,
        *,
        split_seed: int = 0,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        augment_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_count("split_seed", split_seed, 0)
        check_count("train_subset", train_subset, optional=True)
        check_count("eval_subset", eval_subset, optional=True)
        check_count("augment_seed", augment_seed, 0, optional=True)
        self.split_seed = split_seed
        self.train_subset, self.eval_subset = train_subset, eval_subset
        self.augment_seed = augment_seed
        self._info: PairedInfo | None = None

    # -- the contract's properties ----------------------------------------------------------------

    @abstractmethod
    def describe(self) -> PairedInfo:
        """Modalities, per-sample shapes and class names (called once, lazily, then cached)."""

    @property
    def info(self) -> PairedInfo:
        if self._info is None:
            self._info = self.describe()
        return self._info

    @property
    def modalities(self) -> tuple[str, str]:
        return self.info.modalities

    @property
    def modality_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.info.modality_shapes

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    # -- data location ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def expected_files(self) -> Mapping[Expected, str]:
        """The files a data directory must hold, each with what it is (named in errors)."""

    def find_root(self) -> Path:
        """The directory holding :attr:`expected_files`.

        Raises:
            MissingDataFileError: a searched directory holds some of the files but not all; the
                missing ones are named with what they are.
            DatasetNotFoundError: no searched directory holds any of them.
        """
        try:
            return super().find_root()
        except DatasetNotFoundError:
            # A directory with only some of the files is almost surely the user's copy with a
            # modality (or a split) left out: name exactly what is missing.
            expected = self.expected_files
            for directory in self.search_dirs():
                missing = [
                    f"{directory / (item if isinstance(item, str) else item[0])} ({what})"
                    for item, what in expected.items()
                    if not has_file(directory, item)
                ]
                if len(missing) < len(expected):
                    raise MissingDataFileError(
                        f"{self.name}: incomplete data in {directory}: missing "
                        f"{'; '.join(missing)}. To fix it: {'; or '.join(self.how_to_get())}."
                    ) from None
            raise

    # -- datasets ---------------------------------------------------------------------------------

    @abstractmethod
    def load_splits(self) -> tuple[PairedDataset, PairedDataset, PairedDataset]:
        """The full ``(train, val, test)`` datasets, before ``train_subset``/``eval_subset``."""

    def _subset(self, dataset: PairedDataset, size: int | None, stream: int) -> PairedDataset:
        indices = seeded_subset(dataset.indices, size, self.split_seed, stream)
        return dataset if indices is dataset.indices else dataset.subset(indices)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:  # the datasets do not depend on the stage: build them once
            return
        train, val, test = self.load_splits()
        self.train = self._subset(train, self.train_subset, 1)
        if self.augment_seed is not None:
            self.train = self.train.replayable(self.augment_seed)
        self.val = self._subset(val, self.eval_subset, 2)
        self.test = self._subset(test, self.eval_subset, 3)
        self.predict = self.test
