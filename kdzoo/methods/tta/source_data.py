"""How RMT and PSMT read the labelled **source** training data, and cache what they compute from it.

RMT (prototypes, warm-up, source replay) and PSMT (source Fisher) need the source model's
training split, which the test stream does not carry. A method takes it as ``source_data``: a
kdzoo datamodule spec in LightningCLI's form, a plain dict so YAML and jsonargparse carry it::

    source_data:
      class_path: kdzoo.datamodules.FashionMNIST
      init_args: {root: data/fashion_mnist}

It is instantiated here (``class_path`` imported with importlib), ``prepare_data()`` and
``setup("fit")`` are called and its **train** split is read through the datamodule's
**evaluation** transform (spec ``tta.md`` 4.1, "No augmentation": the benchmark's source loader
applies only ToTensor / the model's preprocessing), shuffled by a seeded generator, without
dropping the last batch.

What a method computes from this data (prototypes, warm-up state, Fisher) is cached under
``$KDZOO_HOME/tta/<method>/`` keyed by the source weights' hash, the data spec and the settings
(:func:`cache_path`); files are written atomically. Under DDP, rank 0 computes (or reads) and
broadcasts the result (:func:`on_rank_zero`), so every rank starts from the same state.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdzoo.errors import ConfigError
from kdzoo.methods.training_pass import kdzoo_home

__all__ = [
    "Endless",
    "build_source_datamodule",
    "build_source_loader",
    "cache_path",
    "cached",
    "check_source_data",
    "default_source_batch_size",
    "endless",
    "load_cache",
    "on_rank_zero",
    "save_cache",
    "source_data_key",
]

T = TypeVar("T")

# Settings of a datamodule that do not change which images (or labels) a split holds.
_NOT_DATA = ("num_workers", "batch_size", "augment", "download")


def _parse(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
        raise ConfigError(
            "source_data must be a datamodule spec like {'class_path': "
            f"'kdzoo.datamodules.FashionMNIST', 'init_args': {{...}}}}, got {spec!r}"
        )
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ConfigError(f"source_data has unknown keys {sorted(unknown)}")
    init_args = dict(spec.get("init_args") or {})
    return spec["class_path"], init_args


def build_source_datamodule(spec: Mapping[str, Any]) -> Any:
    """The datamodule ``spec`` names, set up for ``"fit"`` (its ``train`` split is available).

    Raises:
        ConfigError: the spec is malformed or its class cannot be imported.
    """
    class_path, init_args = _parse(spec)
    if "." not in class_path:  # LightningCLI's short form: a kdzoo datamodule's name
        class_path = f"kdzoo.datamodules.{class_path}"
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"source_data: cannot import {class_path!r} ({e})") from None
    datamodule = cls(**init_args)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def check_source_data(
    datamodule: Any,
    num_classes: int,
    in_chans: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> None:
    """Check the source data against the stream.

    Different classes or channels are a :class:`ConfigError` (the source model cannot read
    both). A different normalisation only warns: each side is normalised by its own settings,
    and which one disagrees with the source model's training is checked against the source
    checkpoint's recorded mean/std when it has them (:class:`~kdzoo.methods.tta.TTAModule`).
    """
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


def _train_dataset(datamodule: Any) -> Dataset:
    dataset = getattr(datamodule, "train", None)
    if dataset is None:
        raise ConfigError(f"source_data {type(datamodule).__name__} has no train split")
    build = getattr(datamodule, "build_transform", None)
    if build is None or not hasattr(dataset, "transform"):
        raise ConfigError(
            "source_data must be a kdzoo datamodule (one with build_transform): the source "
            "images are read without augmentation, through its evaluation transform"
        )
    dataset = copy.copy(dataset)  # the datamodule's own train split keeps its augmentation
    dataset.transform = build(train=False)
    return dataset


def build_source_loader(
    spec: Mapping[str, Any] | Any,
    batch_size: int,
    seed: int,
    num_examples: int | None = None,
) -> DataLoader:
    """Shuffled loader over the un-augmented source training split.

    Args:
        spec: a datamodule spec (see the module docstring) or an already built datamodule.
        batch_size: images per batch (the last batch may be smaller).
        seed: seeds the shuffling (every epoch of the loader reshuffles from this generator) and
            the choice of ``num_examples``.
        num_examples: read only this many randomly chosen images (PSMT's 10,000 Fisher images);
            ``None`` reads the whole split.
    """
    if batch_size < 1:
        raise ConfigError(f"source batch size must be >= 1, got {batch_size}")
    datamodule = build_source_datamodule(spec) if isinstance(spec, Mapping) else spec
    dataset = _train_dataset(datamodule)
    generator = torch.Generator().manual_seed(seed)
    if num_examples is not None and num_examples < len(dataset):
        chosen = torch.randperm(len(dataset), generator=generator)[:num_examples]
        dataset = Subset(dataset, chosen.tolist())
    workers = int(getattr(datamodule, "hparams", {}).get("num_workers", 0) or 0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=False,
        num_workers=workers,
    )


class Endless:
    """The loader's batches for ever: a new (reshuffled) epoch whenever one is exhausted, as the
    benchmark's ``next(iter)`` / ``StopIteration`` restart.

    A copy (``copy.deepcopy`` of a method, pickling) shares the loader and starts a new epoch:
    a running DataLoader iterator cannot be copied.
    """

    def __init__(self, loader: DataLoader) -> None:
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
        raise ConfigError("the source data is empty")

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "_iterator": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> Endless:
        return Endless(self.loader)


def endless(loader: DataLoader) -> Endless:
    """:class:`Endless` over ``loader``."""
    return Endless(loader)


def source_data_key(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a data spec that decides which images are read (for cache keys)."""
    class_path, init_args = _parse(spec)
    for name in _NOT_DATA:
        init_args.pop(name, None)
    return {"class_path": class_path, "init_args": init_args}


def cache_path(method: str, what: str, key: Mapping[str, Any]) -> Path:
    """``$KDZOO_HOME/tta/<method>/<what>-<sha256 of key>.pt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return kdzoo_home() / "tta" / method / f"{what}-{digest[:32]}.pt"


def load_cache(path: Path | None) -> Any:
    """The object stored at ``path``, or ``None`` when there is none (tensors on the CPU)."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_cache(path: Path | None, value: Any) -> None:
    """Write ``value`` to ``path`` atomically (a concurrent reader never sees half a file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, partial)
    partial.replace(path)


def on_rank_zero(module: Any, compute: Callable[[], T]) -> T:
    """``compute()`` on global rank 0, broadcast to every rank (a plain call without DDP or
    without a trainer)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return compute()
    value = compute() if trainer.is_global_zero else None
    return trainer.strategy.broadcast(value, src=0)


def cached(
    module: Any, method: str, what: str, key: Mapping[str, Any] | None, compute: Callable[[], T]
) -> T:
    """``compute()``'s value, read from / written to the cache file of ``key`` (no cache when
    ``key`` is ``None``), computed or read on rank 0 and broadcast to every rank."""
    path = cache_path(method, what, key) if key is not None else None

    def run() -> T:
        value = load_cache(path)
        if value is None:
            value = compute()
            save_cache(path, value)
        return value

    return on_rank_zero(module, run)


def default_source_batch_size(module: Any, given: int | None, fallback: int = 200) -> int:
    """``given``, else the batch size of the stream's datamodule (the benchmark's source batch
    size equals the test batch size), else ``fallback`` (the benchmark's CIFAR 200)."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"source_batch_size must be >= 1, got {given}")
        return given
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    size = getattr(datamodule, "hparams", {}).get("batch_size") if datamodule else None
    return int(size) if size else fallback
