"""Tables computed once over a training split before training or adaptation starts.

Several methods read a table measured on training data: ND the teacher's class-mean embeddings,
TGeo-KD the teacher's class-average probabilities, the MCMI teacher its class centroids, RMT the
source model's class prototypes and warm-up state, PSMT the source Fisher information. This module
measures and caches them all the same way:

* **the data** is a training split: the trainer's own (:func:`class_means_on_training_data`,
  read in order, every sample on exactly one rank) or a method's labelled ``source_data``
  datamodule (:func:`source_loader`, shuffled by a seeded generator); either with its training
  augmentation or through the datamodule's evaluation transform (:func:`training_view`);
  :class:`Endless` reads a loader epoch after epoch;
* **class means** are one routine (:class:`ClassMeans`, :func:`class_means`): per-class sums and
  counts accumulated in float64 (in the input's dtype for the in-batch stand-ins) and divided
  once, after the sums of all ranks were added;
* **the cache** is one file per table under ``$KDZOO_HOME/<folder>`` (``class_stats`` for the
  classification methods, ``tta/<method>`` for RMT and PSMT), named by a hash of what was
  measured (:func:`table_key`: the weights of the network measured, the data settings, the
  statistic and its options), written atomically and read with ``torch.load(weights_only=True)``;
* **under DDP** (:func:`compute_once`) either rank 0 reads or computes the table and broadcasts
  it (RMT, PSMT), or rank 0 reads the cache, broadcasts what it found and on a miss every rank
  measures its shard and the sums are all-reduced (the class means), so every rank gets the table
  a single process would compute and ranks never disagree about a cache hit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from kdzoo.errors import ConfigError
from kdzoo.paths import kdzoo_home
from kdzoo.validation import check_at_least

__all__ = [
    "ClassMeans",
    "Endless",
    "cache_file",
    "class_means",
    "class_means_on_training_data",
    "compute_once",
    "default_source_batch_size",
    "endless",
    "rank_shard",
    "source_datamodule",
    "source_loader",
    "table_key",
    "training_loader",
    "training_view",
    "weights_hash",
]

T = TypeVar("T")

# Datamodule settings that never change which images a split holds; ``augment`` only matters
# for a view read with the training augmentation.
_NOT_DATA = ("num_workers", "batch_size", "download")


# ---- class means ---------------------------------------------------------------------------------
class ClassMeans:
    """Per-class sums and counts of rows, accumulated in ``dtype`` in the order they are added.

    Args:
        num_classes: number of classes (rows of the table).
        dtype: accumulation dtype (float64 for tables over a dataset).
        device: where the sums live.
    """

    def __init__(
        self, num_classes: int, *, dtype: torch.dtype = torch.float64, device: Any = "cpu"
    ) -> None:
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=dtype, device=device)

    @classmethod
    def of_batch(cls, values: torch.Tensor, targets: torch.Tensor, num_classes: int) -> ClassMeans:
        """The table of one batch, accumulated in ``values``' own dtype (the in-batch stand-ins
        the methods use outside a fit)."""
        table = cls(num_classes, dtype=values.dtype, device=values.device)
        table.add(values, targets)
        return table

    def add(self, values: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the ``(N, D)`` ``values`` of samples with class indices ``targets``."""
        targets = targets.to(self.counts.device).long()
        values = values.to(device=self.counts.device, dtype=self.counts.dtype)
        if self.sums is None:
            self.sums = values.new_zeros(len(self.counts), values.shape[1])
        self.sums.index_add_(0, targets, values)
        self.counts += torch.bincount(targets, minlength=len(self.counts)).to(self.counts.dtype)

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum sums and counts over DDP ranks (before :meth:`means`, which divides once)."""
        assert self.sums is not None, "add() before all_reduce()"
        self.sums, self.counts = reduce_sum(self.sums), reduce_sum(self.counts)

    def missing(self) -> list[int]:
        """Classes without a sample."""
        return (self.counts == 0).nonzero().flatten().tolist()

    def means(self) -> torch.Tensor:
        """``(C, D)`` means in the accumulation dtype; zero rows for classes without samples."""
        assert self.sums is not None, "add() before means()"
        return self.sums / self.counts.clamp(min=1)[:, None]


@torch.no_grad()
def class_means(
    measure: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Sequence[torch.Tensor]],
    num_classes: int,
    *,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    allow_missing: bool = False,
    stop_after: int | None = None,
    name: str = "class means",
) -> torch.Tensor:
    """``(num_classes, D)`` float32 means of ``measure(inputs)`` over the samples of each class.

    The sums and counts are accumulated in float64 and, under DDP, summed across ranks before the
    division, so the table equals the single-process one as long as the ranks together see every
    sample exactly once (:func:`rank_shard`, not a padding ``DistributedSampler``).

    Args:
        measure: maps a batch of inputs on ``device`` to ``(N, D)`` values (e.g. a frozen teacher).
        batches: ``(inputs, targets, ...)`` batches.
        num_classes: number of classes.
        all_reduce_sum: sums a tensor over DDP ranks; ``None`` in a single process.
        device: where ``measure`` runs.
        allow_missing: give classes without samples a zero row (with a warning) instead of
            raising; for tables only ever indexed by the labels of the same data.
        stop_after: stop once more than this many samples were read (RMT's prototypes).
        name: what the table is, for messages.
    """
    table = ClassMeans(num_classes, device=device)
    seen = 0
    for batch in batches:
        table.add(measure(batch[0].to(device)), batch[1])
        seen += len(batch[1])
        if stop_after is not None and seen > stop_after:
            break
    if table.sums is None:
        raise ConfigError(f"{name}: no data to compute them from (the dataset is empty)")
    if all_reduce_sum is not None:
        table.all_reduce(all_reduce_sum)
    missing = table.missing()
    if missing and not allow_missing:
        raise ConfigError(f"{name}: classes {missing} have no samples in the data")
    if missing:
        warnings.warn(
            f"{name}: classes {missing} have no samples in the data: their rows are zero",
            stacklevel=2,
        )
    return table.means().to(torch.float32)


def rank_shard(length: int, rank: int, world_size: int) -> range:
    """Indices ``rank, rank + world_size, ...``: every sample on exactly one rank, no padding."""
    return range(rank, length, world_size)


# ---- the data ------------------------------------------------------------------------------------
def training_view(dataset: Dataset, datamodule: Any, *, augment: bool) -> Dataset:
    """``dataset`` (a training split) as a table reads it: as it is (with its training
    augmentation), or a shallow copy read through ``datamodule``'s evaluation transform."""
    if augment:
        return dataset
    build = getattr(datamodule, "build_transform", None)
    if build is None or not hasattr(dataset, "transform"):
        raise ConfigError(
            "statistics over un-augmented training images need a kdzoo datamodule (one with "
            f"build_transform), got {type(datamodule).__name__}"
        )
    view = copy.copy(dataset)  # the datamodule's own split keeps its augmentation
    view.transform = build(train=False)
    return view


def training_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int | None = None,
    num_examples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A loader over ``dataset`` for one statistic, keeping the last partial batch.

    Args:
        dataset: the view to read (:func:`training_view`).
        batch_size: samples per batch.
        seed: ``None`` reads in order; else shuffled by a generator seeded with it (every epoch
            of the loader reshuffles from that generator).
        num_examples: read only this many samples, chosen by the seeded generator (PSMT's
            Fisher images); ``None`` reads them all.
        rank, world_size: read only the shard :func:`rank_shard` gives ``rank``.
        num_workers, collate_fn: as DataLoader's.
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if num_examples is not None and num_examples < len(dataset):
        if generator is None:
            raise ValueError("num_examples are chosen by the seeded generator: give a seed")
        chosen = torch.randperm(len(dataset), generator=generator)[:num_examples]
        dataset = Subset(dataset, chosen.tolist())
    if world_size > 1:
        dataset = Subset(dataset, list(rank_shard(len(dataset), rank, world_size)))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )


class Endless:
    """The loader's batches for ever: a new (reshuffled) epoch whenever one is exhausted, as the
    TTA benchmark's ``next(iter)`` / ``StopIteration`` restart.

    A copy (``copy.deepcopy`` of a method, pickling) shares the loader and starts a new epoch:
    a running DataLoader iterator cannot be copied.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> Endless:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ConfigError("the data is empty: an endless loader needs at least one batch")

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "_iterator": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> Endless:
        return Endless(self.loader)


def endless(loader: Iterable[Any]) -> Endless:
    """:class:`Endless` over ``loader``."""
    return Endless(loader)


# ---- the cache and the ranks ---------------------------------------------------------------------
def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def table_key(
    what: str, source: nn.Module, datamodule: Any, *, augment: bool, **options: Any
) -> dict[str, Any] | None:
    """What a table was measured from, for its cache file; ``None`` (no cache) when the data
    cannot be told apart: no datamodule, or one that records no settings (``hparams``).

    Args:
        what: the statistic, e.g. ``"teacher-embedding"``.
        source: the network measured (its weights are hashed).
        datamodule: the data measured (its class and settings, less those that do not change
            the images).
        augment: whether the images carry their training augmentation.
        **options: anything else the table depends on (sample counts, seeds, batch size).
    """
    settings = dict(getattr(datamodule, "hparams", None) or {})
    if not settings:
        return None
    for name in (*_NOT_DATA, *(() if augment else ("augment", "augment_seed"))):
        settings.pop(name, None)
    if settings.get("augment_seed", 0) is None:  # keys of tables measured before the option
        del settings["augment_seed"]
    data_class = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
    return {
        "what": what,
        "weights": weights_hash(source),
        "data": {"class": data_class, "settings": settings, "augment": augment},
        "options": options,
    }


def cache_file(
    key: Mapping[str, Any] | None, folder: str = "class_stats", **more: Any
) -> Path | None:
    """``$KDZOO_HOME/<folder>/<sha256 of key and more>.pt`` (``None`` without a key).

    ``more`` adds to the key: several tables measured from one ``key`` (RMT's prototypes and
    warm-up state) each get their own file.
    """
    if key is None:
        return None
    key = {**key, **more}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return kdzoo_home() / folder / f"{digest}.pt"


def _load(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _save(path: Path | None, value: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, partial)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file


def compute_once(
    trainer: L.Trainer | None, path: Path | None, compute: Callable[[], T], *, sharded: bool = False
) -> T:
    """``compute()``'s value, read from / written to ``path`` (no cache when ``None``), the same
    on every rank.

    Args:
        trainer: its ranks; ``None`` is a single process.
        path: the cache file (:func:`cache_file`).
        compute: measures the table; read from the cache, it is not called.
        sharded: ``False``: only rank 0 computes, then broadcasts. ``True``: every rank computes
            (``compute`` reads its shard and all-reduces) unless rank 0 found the file.
    """
    world_size = trainer.world_size if trainer is not None else 1
    zero = trainer is None or trainer.is_global_zero
    found = _load(path) if zero else None
    if sharded and world_size > 1:
        found = trainer.strategy.broadcast(found, src=0)
    if found is None and (zero or sharded):
        # Forked: computing a table never moves torch's RNG, so a run that reads it from disk,
        # or a rank that does not compute it, draws what a run that computed it draws.
        with torch.random.fork_rng(devices=[]):
            found = compute()
        if zero:
            _save(path, found)
    if not sharded and world_size > 1:
        found = trainer.strategy.broadcast(found, src=0)
    return found


# ---- tables over the trainer's training split ----------------------------------------------------
def class_means_on_training_data(
    trainer: L.Trainer,
    measure: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    *,
    source: nn.Module,
    what: str,
    cache: bool = True,
    augment: bool = True,
) -> torch.Tensor:
    """``(num_classes, D)`` per-class means of ``measure(images)`` over the training data, in
    order, sharded over the ranks and cached under ``$KDZOO_HOME/class_stats``.

    The official ND and MCMI code reuse their training dataset object, so the default reads the
    training augmentation. A class absent from the training data is never a training label, so
    its (zero) row is never read.

    Args:
        trainer: the running trainer (its data, ranks and device are used).
        measure: maps a batch of images on the module's device to ``(N, D)`` values (no grad).
        num_classes: number of classes.
        source: the network ``measure`` evaluates (its weights key the cache).
        what: what is measured, e.g. ``"teacher-embedding"`` (part of the cache key).
        cache: read and write the disk cache.
        augment: read the training images through the training augmentation (else through the
            evaluation transforms).
    """
    device = trainer.strategy.root_device
    datamodule = trainer.datamodule
    key = None
    if cache and datamodule is not None:
        key = table_key(what, source, datamodule, augment=augment, num_classes=num_classes)

    def compute() -> torch.Tensor:
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        loader = _trainer_training_loader(trainer, augment)
        return class_means(
            measure, loader, num_classes, all_reduce_sum=reduce, device=device, allow_missing=True
        )

    return compute_once(trainer, cache_file(key), compute, sharded=True).to(device)


def _trainer_training_loader(trainer: L.Trainer, augment: bool) -> DataLoader:
    """The trainer's training data in order, every sample on exactly one rank."""
    if trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    else:  # dataloaders passed straight to ``trainer.fit``
        data_source = trainer.fit_loop._data_source
        loader = data_source.dataloader() if data_source.is_defined() else None
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                "class statistics need the training data: pass a datamodule or one DataLoader "
                "to fit"
            )
    return training_loader(
        training_view(loader.dataset, trainer.datamodule, augment=augment),
        loader.batch_size or 1,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


# ---- a method's labelled source data (RMT, PSMT) -------------------------------------------------
def source_datamodule(
    datamodule: Any,
    num_classes: int,
    in_chans: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> L.LightningDataModule:
    """``datamodule`` (a method's ``source_data``) prepared, set up for ``"fit"`` and checked
    against the stream.

    Different classes or channels are a :class:`ConfigError` (the source model cannot read
    both). A different normalisation only warns: each side is normalised by its own settings,
    and which one disagrees with the source model's training is checked against the source
    checkpoint's recorded mean/std when it has them (:class:`~kdzoo.methods.tta.TTAModule`).
    """
    if not isinstance(datamodule, L.LightningDataModule):
        raise ConfigError(
            "source_data must be a LightningDataModule (in YAML: {class_path: "
            f"kdzoo.datamodules.FashionMNIST, init_args: {{...}}}}), got {datamodule!r}"
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    for attr, ours in (("num_classes", num_classes), ("in_chans", in_chans)):
        theirs = getattr(datamodule, attr, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise ConfigError(
                f"source_data has {attr}={theirs} but the stream has {ours}: the source data "
                "must be the source model's training data, prepared like the stream"
            )
    for attr, ours in (("mean", mean), ("std", std)):
        theirs = getattr(datamodule, attr, None)
        if theirs is not None and ours is not None and tuple(theirs) != tuple(ours):
            warnings.warn(
                f"source_data is normalised with {attr} {tuple(theirs)} but the stream with "
                f"{tuple(ours)}: one of them does not match the source model's training",
                stacklevel=2,
            )
    return datamodule


def source_loader(
    datamodule: Any, batch_size: int, seed: int, num_examples: int | None = None
) -> DataLoader:
    """Shuffled loader over the **un-augmented** training split of a set-up source datamodule.

    The TTA benchmark's source loader applies only the model's preprocessing (spec ``tta.md``
    4.1, "No augmentation") and does not drop the last batch.

    Args:
        datamodule: the source data (:func:`source_datamodule`).
        batch_size: images per batch (the last batch may be smaller).
        seed: seeds the shuffling and the choice of ``num_examples``.
        num_examples: read only this many randomly chosen images; ``None`` reads the split.
    """
    check_at_least(1, source_batch_size=batch_size)
    dataset = getattr(datamodule, "train", None)
    if dataset is None:
        raise ConfigError(f"source_data {type(datamodule).__name__} has no train split")
    workers = int(getattr(datamodule, "hparams", {}).get("num_workers", 0) or 0)
    return training_loader(
        training_view(dataset, datamodule, augment=False),
        batch_size,
        seed=seed,
        num_examples=num_examples,
        num_workers=workers,
    )


def default_source_batch_size(module: Any, given: int | None, fallback: int = 200) -> int:
    """The source batch size of a TTA method: ``given``, else the test stream's batch size (the
    benchmark's source batch size equals the test batch size), else ``fallback`` (the
    benchmark's CIFAR 200, for a module driven by hand, outside a trainer).

    One rule for ``kdzoo test`` and for ``trainer.test(module, ...)`` from Python: the stream's
    batch size is the ``batch_size`` of the trainer's datamodule (its hyper-parameter, else its
    attribute; ``trainer.test(module, datamodule=...)`` and the CLI), else the ``batch_size`` of
    the trainer's first test dataloader (``trainer.test(module, dataloaders=...)``; a loader of
    pre-batched items has none). Call it once the test loop has its data (``on_test_start``).
    """
    if given is not None:
        check_at_least(1, source_batch_size=given)
        return given
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return fallback
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        size = (getattr(datamodule, "hparams", None) or {}).get("batch_size")
        size = size or getattr(datamodule, "batch_size", None)
        if size:
            return int(size)
    loaders = getattr(trainer, "test_dataloaders", None)
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    size = getattr(loaders[0], "batch_size", None) if loaders else None
    return int(size) if size else fallback
