"""Per-class mean embeddings of a teacher over a dataset (ND's class centres, MCMI's centroids).

The sums and counts are accumulated in float64 and, under DDP, summed across ranks before the
division, so every rank gets the same table and it equals the single-process one as long as the
ranks together see every sample exactly once (use :func:`rank_shard`, not a padding
``DistributedSampler``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from kdzoo.errors import ConfigError

__all__ = ["class_mean_embeddings", "rank_shard"]


@torch.no_grad()
def class_mean_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    allow_missing: bool = False,
) -> torch.Tensor:
    """``(num_classes, D)`` arithmetic means of ``embed(x)`` over the samples of each class.

    Args:
        embed: maps a batch of inputs to ``(N, D)`` embeddings (e.g. a frozen teacher).
        batches: ``(inputs, targets)`` pairs.
        num_classes: number of classes; every class must occur at least once.
        all_reduce_sum: sums a tensor over DDP ranks (e.g. ``trainer.strategy.reduce(t,
            reduce_op="sum")``); ``None`` in a single process.
        device: where ``embed`` runs.
        allow_missing: give classes without samples a row of zeros (with a warning) instead of
            raising; for tables only ever indexed by the labels of the same data.
    """
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for inputs, targets in batches:
        targets = targets.to(device)
        embeddings = embed(inputs.to(device)).to(torch.float64)
        if sums is None:
            sums = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, targets, embeddings)
        counts += torch.bincount(targets, minlength=num_classes).to(torch.float64)
    if sums is None:
        raise ConfigError("no data to compute class means from (the dataset is empty)")
    if all_reduce_sum is not None:
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing and not allow_missing:
        raise ConfigError(f"classes {missing} have no samples to compute their mean embedding")
    if missing:
        warnings.warn(
            f"classes {missing} have no samples in the data: their class-mean rows are zero",
            stacklevel=2,
        )
    return (sums / counts.clamp(min=1)[:, None]).to(torch.float32)


def rank_shard(length: int, rank: int, world_size: int) -> range:
    """Indices ``rank, rank + world_size, ...``: every sample on exactly one rank, no padding."""
    return range(rank, length, world_size)
