"""The skeleton of every kdzoo DataModule: where the data is, how it is checked and loaded.

:class:`KDZooDataModule` owns what the four families share (image classification in
:mod:`kdzoo.datamodules.base`, paired modalities in :mod:`kdzoo.datamodules.paired`, semantic
segmentation in :mod:`kdzoo.datamodules.segmentation`, corruption streams in
:mod:`kdzoo.datamodules.corruption_stream`):

- the arguments ``root``, ``batch_size`` and ``num_workers``, checked once. A subclass takes its own
  arguments, keyword-only (a positional value is an error, never silently another argument), plus
  ``**kwargs`` forwarded to ``super().__init__``; it restates a base's argument only to change
  its default or meaning. jsonargparse follows the ``**kwargs``, so ``--data.help NAME`` and
  ``--print_config`` still list every argument (a base argument the subclass passes itself is
  left out), and Lightning's ``save_hyperparameters`` (called here) collects every level's;
- the dataset root (:func:`resolve_root`): ``root`` if given, the only place then searched; else
  ``$KDZOO_DATA/<subdir>``, the download cache ``~/.cache/kdzoo/data/<subdir>`` and known system
  directories. A missing dataset raises :class:`DatasetNotFoundError` naming every directory tried,
  the expected files and how to get them;
- ``prepare_data()``: checks that the data is there, downloading it first only where the dataset
  can be downloaded and the user allowed it;
- the loaders: ``setup()`` stores the datasets in ``train``/``val``/``test``/``predict`` and the
  ``*_dataloader`` hooks serve them through a
  :class:`~kdzoo.datamodules.loading.ReseedingDataLoader`, so the order and augmentations of
  epoch ``e`` depend only on ``(loader seed, e)`` (see :mod:`kdzoo.datamodules.loading`);
- the properties the ``kdzoo`` command links into the model (:data:`LINKED_DATA_ATTRIBUTES`),
  logged with their resolved values (:class:`ResolvedHparamsMixin`).

Errors a user fixes (missing data, bad arguments) derive from :class:`~kdzoo.errors.KDZooError`,
which the ``kdzoo`` command prints as one line.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, get_args

import lightning as L
import numpy as np
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset

from kdzoo.datamodules.loading import ReseedingDataLoader, loader_start, seed_worker
from kdzoo.errors import DataError, KDZooError

__all__ = [
    "LINKED_DATA_ATTRIBUTES",
    "DatasetNotFoundError",
    "Expected",
    "KDZooDataModule",
    "ResolvedHparamsMixin",
    "check_arg",
    "check_choice",
    "check_count",
    "check_fraction",
    "default_cache_dir",
    "holdout_split",
    "resolve_root",
    "seeded_subset",
]

# One expected file, or a tuple of acceptable alternatives (e.g. plain or gzipped).
Expected = str | tuple[str, ...]


class DatasetNotFoundError(KDZooError, FileNotFoundError):
    """A dataset's files are in none of the directories kdzoo looked in."""


# -- argument checks ------------------------------------------------------------------------------


def check_arg(name: str, value: Any, ok: bool, accepted: str) -> None:
    """Raise ``DataError("<name> must be <accepted>, got <value>")`` unless ``ok``."""
    if not ok:
        raise DataError(f"{name} must be {accepted}, got {value!r}")


def check_count(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """``value`` is an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    ok = (optional and value is None) or (isinstance(value, Integral) and value >= minimum)
    check_arg(name, value, ok, f"{'None or ' if optional else ''}an integer >= {minimum}")


def check_fraction(name: str, value: float, *, zero_ok: bool = False) -> None:
    """``value`` is in ``(0, 1)``, or ``[0, 1)`` when ``zero_ok``."""
    low_ok = value >= 0.0 if zero_ok else value > 0.0
    check_arg(name, value, low_ok and value < 1.0, "in [0, 1)" if zero_ok else "in (0, 1)")


def check_choice(name: str, value: Any, literal: Any) -> None:
    """``value`` is one of the values of the ``Literal`` type ``literal``.

    The CLI already enforces a ``Literal`` argument. Call this only where a Python caller's
    misspelt choice would otherwise pass silently (e.g. fall through to another branch).
    """
    choices = get_args(literal)
    accepted = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
    check_arg(name, value, value in choices, accepted)


# -- where the data is ----------------------------------------------------------------------------


def default_cache_dir(subdir: str) -> Path:
    """Where ``download=True`` stores data when neither ``root`` nor ``$KDZOO_DATA`` is set."""
    return Path.home() / ".cache" / "kdzoo" / "data" / subdir


def search_bases(
    root: str | os.PathLike | None, subdir: str, system_dirs: Sequence[str | os.PathLike] = ()
) -> tuple[list[Path], str | None]:
    """The base directories searched for a dataset, in order, and a note on the one skipped.

    ``root`` alone when given; else ``$KDZOO_DATA/<subdir>`` (skipped, with the note, when the
    variable is unset), ``~/.cache/kdzoo/data/<subdir>`` and ``system_dirs``.
    """
    if root is not None:
        return [Path(root).expanduser()], None
    env = os.environ.get("KDZOO_DATA")
    bases = [Path(env).expanduser() / subdir] if env else []
    skipped = None if env else f"$KDZOO_DATA/{subdir} (skipped: $KDZOO_DATA is not set)"
    return [*bases, default_cache_dir(subdir), *map(Path, system_dirs)], skipped


def _describe(item: Expected) -> str:
    return item if isinstance(item, str) else " or ".join(item)


def has_file(directory: Path, item: Expected) -> bool:
    """Whether ``directory`` holds ``item`` (any of its alternatives, for a tuple)."""
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
    bases, skipped = search_bases(root, subdir, system_dirs)
    tried: list[Path] = []
    for base in bases:
        for layout in layouts:
            directory = base / layout if layout else base
            if directory in tried:
                continue
            tried.append(directory)
            if all(has_file(directory, item) for item in expected):
                return directory

    lines = [f"{dataset} not found. Looked in:"]
    lines += [f"  - {d}" for d in tried]
    if skipped:
        lines.append(f"  - {skipped}")
    lines.append("Expected files: " + ", ".join(_describe(item) for item in expected) + ".")
    if how_to_get:
        lines.append("To get it: " + "; or ".join(how_to_get) + ".")
    raise DatasetNotFoundError("\n".join(lines))


# -- splits ---------------------------------------------------------------------------------------


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, val)`` indices of ``n`` items, ``round(n * fraction)`` of them held out.

    The permutation comes from its own generator seeded by ``seed``: the split never depends on
    (or disturbs) the global RNG.
    """
    n_val = round(n * fraction)
    if n_val >= n:
        raise DataError(f"val_fraction={fraction} leaves none of the {n} training samples")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def seeded_subset(indices: np.ndarray, size: int | None, seed: int, stream: int) -> np.ndarray:
    """``size`` of ``indices`` drawn with the generator ``(seed, stream)``, sorted; ``indices``
    itself when ``size`` is ``None`` or not smaller.

    One ``stream`` per split (train 1, val 2, test 3), so e.g. the val subset does not change with
    ``train_subset``.
    """
    if size is None or size >= len(indices):
        return indices
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.permutation(indices)[:size])


# -- the DataModule -------------------------------------------------------------------------------

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


class KDZooDataModule(ResolvedHparamsMixin, L.LightningDataModule, ABC):
    """The skeleton of every kdzoo DataModule (see the module docstring).

    Subclasses describe their data with the class attributes below, implement ``setup()`` (store
    the datasets in ``train``, ``val``, ``test`` and ``predict``) and override what differs.

    Args:
        root: directory holding the data (the only place searched when given); ``None`` searches
            ``$KDZOO_DATA/<subdir>``, the download cache and known system locations (see
            :func:`resolve_root`).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes per loader (0 loads in the main process).
    """

    name: str = "dataset"
    #: ``$KDZOO_DATA/<data_subdir>`` and ``~/.cache/kdzoo/data/<data_subdir>`` are searched.
    data_subdir: str = ""
    #: Relative paths tried under every searched directory (``""``: the directory itself).
    layouts: tuple[str, ...] = ("",)
    system_dirs: tuple[str, ...] = ()
    #: The files (or folders) a data directory must hold; a mapping names what each one is.
    expected_files: Sequence[Expected] | Mapping[Expected, str] = ()
    #: What ``expected_files`` are, in the missing-data hint ("files" or "folders").
    expected_kind: str = "files"
    #: How to obtain the data, first hint of the missing-data error (e.g. an install command).
    install_hint: str | None = None
    #: Whether :meth:`download` can fetch the data (then ``prepare_data`` does, if allowed).
    can_download: bool = False
    #: Arguments left out of ``hparams``.
    unsaved_arguments: tuple[str, ...] = ()

    def __init__(
        self, root: str | None = None, batch_size: int = 128, num_workers: int = 0
    ) -> None:
        super().__init__()
        check_count("batch_size", batch_size)
        check_count("num_workers", num_workers, 0)
        # Collects the arguments of every subclass's __init__ too (their frames are still open).
        self.save_hyperparameters(ignore=list(self.unsaved_arguments))
        self.root = root
        self.batch_size, self.num_workers = batch_size, num_workers
        #: Set by subclasses with a ``download`` argument: ``prepare_data`` may download.
        self.allow_download = False
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.test: Dataset | None = None
        self.predict: Dataset | None = None

    # -- data location ----------------------------------------------------------------------------

    def search_dirs(self) -> list[Path]:
        """The base directories searched for the data, in order (without ``layouts``)."""
        return search_bases(self.root, self.data_subdir, self.system_dirs)[0]

    def download_dir(self) -> Path:
        """Where ``prepare_data()`` downloads to: ``root``, else ``$KDZOO_DATA/<subdir>``, else
        the user cache (the first directory searched)."""
        return self.search_dirs()[0]

    def how_to_get(self) -> list[str]:
        """The hints of the missing-data error, each a way to get the data."""
        hints = []
        if self.install_hint:
            # A system copy is found only by searching, which an explicit root prevents.
            explicit = bool(self.system_dirs) and self.root is not None
            unset = " and leave --data.root unset" if explicit else ""
            hints.append(self.install_hint + unset)
        places = " or ".join(f"DIR/{layout}" if layout else "DIR" for layout in self.layouts)
        hints.append(f"pass --data.root DIR where {places} holds these {self.expected_kind}")
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
            list(self.expected_files),
            layouts=self.layouts,
            system_dirs=self.system_dirs,
            how_to_get=self.how_to_get(),
        )

    def download(self, directory: Path) -> None:
        """Download the dataset into ``directory`` (subclasses with ``can_download``)."""
        raise DataError(f"kdzoo cannot download {self.name}: {'; '.join(self.how_to_get())}")

    def prepare_data(self) -> None:
        """Check the data is present, downloading it first if missing and allowed."""
        try:
            self.find_root()
        except DatasetNotFoundError:
            if not (self.allow_download and self.can_download):
                raise
            directory = self.download_dir()
            directory.mkdir(parents=True, exist_ok=True)
            self.download(directory)
            self.find_root()

    # -- datasets and loaders ---------------------------------------------------------------------

    @abstractmethod
    def setup(self, stage: str | None = None) -> None:
        """Build ``train``, ``val``, ``test`` and ``predict`` (once: they do not depend on the
        stage). Must never download."""

    @property
    def global_rank(self) -> int:
        """The trainer's global rank (0 without a trainer), mixed into augmentation seeds."""
        return self.trainer.global_rank if self.trainer is not None else 0

    def require_setup(self, dataset: Any) -> Any:
        """``dataset``, which ``setup()`` must have built (a RuntimeError otherwise)."""
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")
        return dataset

    def loader(self, dataset: Dataset | None, train: bool = False, **kwargs: Any) -> DataLoader:
        """A :class:`ReseedingDataLoader` over ``dataset``, shuffled for training.

        ``kwargs`` override the DataLoader arguments (e.g. ``batch_size``, ``collate_fn``).
        Workers persist across epochs; a training loader starts where a resumed run left off.
        """
        dataset = self.require_setup(dataset)
        options = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": seed_worker,
            "drop_last": False,
            **kwargs,
        }
        return ReseedingDataLoader(
            dataset, shuffle=train, **options, **loader_start(self.trainer, train=train)
        )

    def train_dataloader(self) -> Any:
        return self.loader(self.train, train=True)

    def val_dataloader(self) -> Any:
        return self.loader(self.val)

    def test_dataloader(self) -> Any:
        return self.loader(self.test)

    def predict_dataloader(self) -> Any:
        return self.loader(self.predict)
