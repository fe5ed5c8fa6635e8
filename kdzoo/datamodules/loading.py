"""Datasets and loaders whose every random draw is a function of (loader seed, epoch, item).

:class:`TransformedDataset` runs each item through an albumentations pipeline reseeded per item;
:class:`ReseedingDataLoader` shuffles epoch ``e`` with a generator seeded from ``(seed, e)`` and
tells the dataset the epoch, so the augmentation of item ``j`` in epoch ``e`` depends on
``(seed, e, j)`` only, whatever the number of worker processes or ranks (of ``(augment_seed, e,
j)`` only when the dataset has an :attr:`TransformedDataset.augment_seed`). Nothing here consumes
the global RNG after the loader is built: a run resumed from a checkpoint (see
:mod:`kdzoo.checkpointing`) sees the same batches as the run that was never interrupted.
"""

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, get_worker_info

from kdzoo.errors import DataError

__all__ = [
    "ArrayDataset",
    "EpochSampler",
    "ReseedingDataLoader",
    "TransformedDataset",
    "loader_start",
    "mix64",
    "seed_worker",
    "training_position",
]


class TransformedDataset(Dataset, ABC):
    """Base for datasets that run each item through an albumentations pipeline.

    Albumentations 2.x keeps its own RNG, independent of numpy/torch global state. Read through a
    :class:`ReseedingDataLoader`, that RNG restarts at every item from ``(loader seed, epoch,
    item)`` (:meth:`seed_item`), so an item's augmentation depends neither on the worker process
    or rank that loads it nor on what was loaded before. Indexed directly, the dataset draws from
    one stream started by :meth:`reseed`, which mixes in ``rank`` (the trainer's global rank) so
    that DDP ranks, which share the seed of ``seed_everything``, draw different sequences.

    With :attr:`augment_seed` set (exact replay, e.g. for a teacher-output cache), item ``j`` is
    augmented from ``(augment_seed, e, j)`` instead, ``e`` being the epoch of the current
    :attr:`stream` (0 without one), whatever the loader seed, and items are ``(image, target,
    j)``; :meth:`view` gives the view of any epoch.
    """

    #: ``[loader seed, epoch]`` of the :class:`ReseedingDataLoader` reading this dataset (in shared
    #: memory with worker processes, so that persistent workers see every new epoch); ``None``
    #: while the dataset is only indexed directly.
    stream: torch.Tensor | None = None
    #: Exact-replay mode when set: the augmentation of item ``j`` (underlying position) in epoch
    #: ``e`` is a function of ``(augment_seed, e, j)`` only (the loader seed then only orders the
    #: items), ``e`` being the :attr:`stream`'s epoch, or 0 when the dataset is indexed directly;
    #: and items carry their sample id ``j`` as a third element.
    augment_seed: int | None = None

    def __init__(
        self, targets: Any, transform: A.Compose, indices: Any = None, rank: int = 0
    ) -> None:
        self._targets = np.asarray(targets, dtype=np.int64)
        n = len(self._targets)
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.rank = rank
        # A fixed start so that indexing the dataset directly is reproducible too; the loaders
        # reseed at every epoch.
        self.reseed(0)

    @property
    def targets(self) -> np.ndarray:
        """Labels of the items in this dataset (after split and subset)."""
        return self._targets[self.indices]

    @property
    def sample_ids(self) -> np.ndarray:
        """The sample id of each item: its position in the underlying data (stable under the
        train/val split, subsets and class selection); the ids batches carry with
        :attr:`augment_seed`."""
        return self.indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        j = int(self.indices[i])
        if self.augment_seed is not None:
            epoch = 0 if self.stream is None else int(self.stream[1])
            return self._replay(j, epoch)
        self.seed_item(j)
        image = self.transform(image=self.load_image(j))["image"]
        return image, int(self._targets[j])

    def view(self, i: int, epoch: int) -> tuple[torch.Tensor, int, int]:
        """``(image, target, sample id)`` of item ``i`` as training reads it in ``epoch`` with
        :attr:`augment_seed` (what a loader at that epoch yields), leaving :attr:`stream` as it
        is. Reseeds this process's augmentation RNG only, so it is safe in worker processes.

        Raises:
            DataError: if :attr:`augment_seed` is not set (the views are then not replayable).
        """
        if self.augment_seed is None:
            raise DataError(
                f"{type(self).__name__}.view needs augment_seed: without it the augmentation "
                "depends on the loader's seed and cannot be replayed"
            )
        return self._replay(int(self.indices[i]), epoch)

    def _replay(self, j: int, epoch: int) -> tuple[torch.Tensor, int, int]:
        """Item ``j`` (underlying position) augmented from ``(augment_seed, epoch, j)``."""
        self._seed_rngs(mix64(self.augment_seed, epoch, j))
        image = self.transform(image=self.load_image(j))["image"]
        return image, int(self._targets[j]), j

    @abstractmethod
    def load_image(self, j: int) -> np.ndarray:
        """The uint8 ``H x W x C`` image at position ``j`` of the underlying data."""

    def reseed(self, seed: int) -> None:
        """Restart the augmentation RNG from ``seed`` (mixed with ``rank``)."""
        mixed = int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])
        # One shared generator for the whole pipeline: ``Compose.set_random_seed`` would give
        # every transform its own generator with the same seed, correlating e.g. crop and flip.
        self._np_rng, self._py_rng = np.random.default_rng(mixed), random.Random(mixed)
        self.transform.set_random_state(self._np_rng, self._py_rng)

    def seed_item(self, j: int) -> None:
        """Restart the augmentation RNG for item ``j`` (underlying position) of the current
        :attr:`stream`; nothing without one.

        The pipeline's generators are reseeded in place (a new pair would cost more than
        augmenting a small image).
        """
        if self.stream is None:
            return
        seed, epoch = self.stream.tolist()
        self._seed_rngs(mix64(seed, epoch, j))

    def _seed_rngs(self, state: int) -> None:
        """Restart the pipeline's generators, in place, from the 64-bit ``state``."""
        self._np_rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": mix64(state) | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        self._py_rng.seed(state)


class ArrayDataset(TransformedDataset):
    """In-memory uint8 images ``(N, H, W, C)`` with integer labels, viewed through ``indices``."""

    def __init__(
        self,
        images: np.ndarray,
        targets: Any,
        transform: A.Compose,
        indices: Any = None,
        rank: int = 0,
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 array (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if len(images) != len(targets):
            raise DataError(f"{len(images)} images but {len(targets)} labels")
        super().__init__(targets, transform, indices, rank)
        self.images = images

    def load_image(self, j: int) -> np.ndarray:
        return self.images[j]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` seeding numpy, ``random`` and the dataset's direct-indexing stream.

    torch has already seeded this worker with ``base_seed + worker_id``; ``base_seed`` is drawn from
    the loader's generator when the workers start (a :class:`ReseedingDataLoader` seeds it from its
    seed and the epoch), else from the main process's torch RNG; with persistent workers, each
    worker's streams simply carry on. Augmentations read through a :class:`ReseedingDataLoader`
    are reseeded per item instead (:meth:`TransformedDataset.seed_item`). Lightning installs its
    own seeding only for loaders without a ``worker_init_fn``, so this one must also cover numpy
    and ``random``.
    """
    info = get_worker_info()
    dataset = info.dataset if info is not None else None
    rank = getattr(dataset, "rank", 0)
    np_seed, py_seed = np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(2)
    np.random.seed(int(np_seed))
    random.seed(int(py_seed))
    if isinstance(dataset, TransformedDataset):
        dataset.reseed(torch.initial_seed())


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64(*values: int) -> int:
    """A 64-bit hash of integers (chained SplitMix64 finalisers, Steele et al., OOPSLA 2014):
    unrelated-looking seeds from close inputs such as ``(seed, epoch, item)``."""
    h = 0x243F6A8885A308D3
    for value in values:
        h = _splitmix64(h ^ (value & _MASK64))
    return h


class EpochSampler(RandomSampler):
    """A random order of the dataset that depends only on ``(seed, epoch)``.

    ``set_epoch`` (Lightning calls it before every training epoch) picks the epoch; otherwise each
    pass moves on to the next epoch, as a shuffled DataLoader gives a new order at every pass.
    ``skip`` items are left out at the start of the next pass only (resuming inside an epoch).
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch, self.skip = seed, epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip = self.skip, 0
        generator = torch.Generator().manual_seed(mix64(self.seed, epoch) >> 1)
        yield from torch.randperm(len(self.data_source), generator=generator)[skip:].tolist()


def training_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches of it already trained)`` where a training loader built now starts.

    ``(0, 0)`` for a new run; for a resumed run, where the checkpoint left off: the next epoch after
    an end-of-epoch checkpoint, or the interrupted epoch after a checkpoint saved inside it.
    Lightning creates the training iterator, and fetches its first batch, before it calls the
    samplers' ``set_epoch`` (Lightning issue #21938), so the loader must know this when it is built.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return 0, 0
    epochs = loop.epoch_progress.current
    if epochs.started > epochs.processed:  # restored from a checkpoint saved inside an epoch
        return epochs.processed, loop.epoch_loop.batch_progress.current.processed
    return epochs.processed, 0


def loader_start(trainer: Any, train: bool) -> dict[str, int]:
    """``epoch``/``skip_batches`` arguments of a :class:`ReseedingDataLoader`: the
    :func:`training_position` for a training loader, the start for the others."""
    epoch, skip_batches = training_position(trainer) if train else (0, 0)
    return {"epoch": epoch, "skip_batches": skip_batches}


class ReseedingDataLoader(DataLoader):
    """A DataLoader whose epoch ``e`` depends only on its seed and ``e``.

    With ``shuffle=True`` the order is an :class:`EpochSampler`'s (under DDP, Lightning's
    DistributedSampler, seeded by ``seed_everything``, replaces it); item ``j`` of a
    :class:`TransformedDataset` is augmented from ``(seed, e, j)``. ``e`` is the sampler's epoch
    (Lightning sets it before every training epoch), else the count of passes. Nothing here draws
    from the global RNG after construction (the worker processes' base seed comes from the loader's
    own generator), so validation, or resuming a run, cannot shift the training data. The seed is
    the loader's checkpointed state (``state_dict``, saved by Lightning with the training loops).

    Args:
        seed: the loader's seed; ``None`` draws one from torch's global RNG, so that
            ``seed_everything`` fixes it and loaders built one after the other differ.
        epoch: the epoch of the first pass.
        skip_batches: batches of that epoch to leave out, as already trained (a longer count
            moves on by whole passes); ``epoch`` and ``skip_batches`` come from
            :func:`training_position` for a training loader.
        The other arguments are DataLoader's, whose signature is kept so that Lightning can
        re-instantiate the loader (e.g. with a DistributedSampler).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler | Iterable | None = None,
        *args: Any,
        seed: int | None = None,
        epoch: int = 0,
        skip_batches: int = 0,
        **kwargs: Any,
    ) -> None:
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if shuffle and sampler is None and kwargs.get("batch_sampler") is None:
            sampler, shuffle = EpochSampler(dataset, seed), None
        kwargs["generator"] = kwargs.get("generator") or torch.Generator()
        super().__init__(dataset, batch_size, shuffle, sampler, *args, **kwargs)
        self.seed = seed
        self._stream = torch.tensor([seed, epoch], dtype=torch.int64)
        if self.num_workers > 0:
            self._stream.share_memory_()
        passes, self._skip = divmod(skip_batches, len(self)) if skip_batches else (0, 0)
        self.epoch = self._passes = epoch + passes
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(self.epoch)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.seed = int(state_dict["seed"])
        if isinstance(self.sampler, EpochSampler):
            self.sampler.seed = self.seed

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", None)
        if not isinstance(epoch, int):
            epoch, self._passes = self._passes, self._passes + 1
        self.epoch = epoch
        self._stream.copy_(torch.tensor([self.seed, epoch], dtype=torch.int64))
        if isinstance(self.dataset, TransformedDataset):
            self.dataset.stream = self._stream
        self.generator.manual_seed(mix64(self.seed, epoch, 1) >> 1)
        skip, self._skip = self._skip, 0
        if skip and isinstance(self.sampler, EpochSampler) and self.batch_size:
            self.sampler.skip = skip * self.batch_size  # cheap: the items are never loaded
            skip = 0
        iterator = super().__iter__()
        for _ in range(skip):  # other samplers: load and drop the batches already trained
            next(iterator)
        return iterator
