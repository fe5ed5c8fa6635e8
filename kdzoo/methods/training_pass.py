"""Class statistics from one pass over the training data before training starts.

ND needs the teacher's class-mean embeddings, the MCMI teacher its class centroids and TGeo-KD the
teacher's class-average probabilities. All three are per-class means of some function of the
training images, computed once in ``on_fit_start``; this module does that pass the same way for
each of them:

* the data is the **training split with its training augmentation** (the official ND and MCMI code
  reuse their training dataset object), read in order, without shuffling;
* under DDP every sample is read on exactly one rank (:func:`~kdzoo.losses.class_means.rank_shard`)
  and the per-class sums are summed across ranks before dividing, so every rank gets the table a
  single process would compute;
* the table is cached on disk under ``$KDZOO_HOME/class_stats`` (default ``~/.cache/kdzoo``), keyed
  by a hash of the weights of the network it came from, of the data module's settings and of what
  was measured, so a second run with the same teacher and data skips the pass. Rank 0 reads the
  cache and broadcasts what it found, so ranks never disagree about a hit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdzoo.errors import ConfigError
from kdzoo.losses.class_means import class_mean_embeddings, rank_shard
from kdzoo.paths import kdzoo_home

__all__ = ["class_means_on_training_data", "kdzoo_home", "training_pass_loader", "weights_hash"]


def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_pass_loader(trainer: Trainer, augment: bool = True) -> DataLoader:
    """The training data, unshuffled, every sample on exactly one rank.

    With ``augment=False`` the training split is read through the datamodule's evaluation
    transforms instead of its training augmentation.
    """
    loader = _train_dataloader(trainer)
    dataset = loader.dataset
    if not augment:
        build = getattr(trainer.datamodule, "build_transform", None)
        if build is None or not hasattr(dataset, "transform"):
            raise ConfigError(
                "class statistics on un-augmented training images need a kdzoo datamodule "
                "(one with build_transform); set the method's augment option to true"
            )
        dataset = copy.copy(dataset)
        dataset.transform = build(train=False)
    indices = rank_shard(len(dataset), trainer.global_rank, trainer.world_size)
    return DataLoader(
        Subset(dataset, list(indices)),
        batch_size=loader.batch_size or 1,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


def class_means_on_training_data(
    trainer: Trainer,
    measure: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    *,
    source: nn.Module,
    what: str,
    cache: bool = True,
    augment: bool = True,
) -> torch.Tensor:
    """``(num_classes, D)`` per-class means of ``measure(images)`` over the training data.

    Args:
        trainer: the running trainer (its data, ranks and device are used).
        measure: maps a batch of images on the module's device to ``(N, D)`` values (no grad).
        num_classes: number of classes; every class must occur in the training data.
        source: the network ``measure`` evaluates (its weights key the cache).
        what: what is measured, e.g. ``"embedding"`` or ``"softmax"`` (part of the cache key).
        cache: read and write the disk cache.
        augment: read the training images through the training augmentation (else through the
            evaluation transforms).
    """
    # Without a datamodule there is nothing to say which data the table came from: no cache.
    cached_ok = cache and trainer.datamodule is not None
    what = f"{what}|augment={augment}"
    path = _cache_path(trainer, source, what, num_classes) if cached_ok else None
    cached = None
    if path is not None and trainer.is_global_zero and path.is_file():
        cached = load_file(str(path))["class_means"]
    if trainer.world_size > 1:
        cached = trainer.strategy.broadcast(cached, src=0)
    if cached is not None:
        return cached.to(trainer.strategy.root_device)

    device = trainer.strategy.root_device
    reduce = None
    if trainer.world_size > 1:
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
    batches = ((batch[0], batch[1]) for batch in training_pass_loader(trainer, augment))
    # A class absent from the training data is never a training label, so its row is never read.
    means = class_mean_embeddings(
        measure, batches, num_classes, all_reduce_sum=reduce, device=device, allow_missing=True
    )
    if path is not None and trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"class_means": means.cpu().contiguous()}, str(partial))
        partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return means


def _cache_path(trainer: Trainer, source: nn.Module, what: str, num_classes: int) -> Path:
    data = trainer.datamodule
    data_key: Any = {"class": type(data).__qualname__, "hparams": dict(data.hparams)}
    data_key["hparams"].pop("num_workers", None)  # does not change the data
    data_key["hparams"].pop("batch_size", None)
    key = json.dumps(
        {"weights": weights_hash(source), "data": data_key, "what": what, "C": num_classes},
        sort_keys=True,
        default=str,
    )
    return kdzoo_home() / "class_stats" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def _train_dataloader(trainer: Trainer) -> DataLoader:
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    source = trainer.fit_loop._data_source  # dataloaders passed straight to ``trainer.fit``
    loader = source.dataloader() if source.is_defined() else None
    if not isinstance(loader, DataLoader):
        raise RuntimeError(
            "class statistics need the training data: pass a datamodule or one DataLoader to fit"
        )
    return loader
