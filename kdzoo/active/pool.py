"""Running the student over the unlabelled pool, on one process or sharded across DDP ranks.

Selection needs, for every pool image, the student's combined probability ``p~`` and its pooled
feature (spec §2.5). Under DDP each rank runs its :class:`~torch.utils.data.DistributedSampler`
shard; the shards are gathered together with the images' dataset indices, ordered by index, and
the sampler's padding (it repeats the first images so that every rank gets as many) is dropped.
Every rank then holds the same pool outputs, in the same order, as a single process would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["PoolOutputs", "gather_shards", "merge_shards", "predict_pool", "run_model"]

# Selection always reads p~ with these (the code fixes them: no validation set to tune them on).
SELECTION_ALPHA = 0.5
SELECTION_BETA = 1.0


@dataclass
class PoolOutputs:
    """The student's outputs on a set of images.

    Attributes:
        indices: ``(N,)`` dataset indices of the images.
        probs: ``(N, C)`` combined probabilities ``p~``.
        features: ``(N, D)`` pooled penultimate features.
    """

    indices: torch.Tensor
    probs: torch.Tensor
    features: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


def run_model(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p~, feature)`` of a batch.

    A dual-head student (``heads`` + ``combined_probs``, as
    :class:`~kdzoo.methods.DualHeadDistillation`) gives ``0.5 softmax(h_ce) + 0.5 softmax(h_kd)``;
    any other kdzoo classifier (a ``student`` :class:`~kdzoo.models.backbone.Backbone`, e.g.
    active learning without distillation) gives the softmax of its one head and its embedding.
    """
    if hasattr(model, "heads") and hasattr(model, "combined_probs"):
        ce_logits, kd_logits, features = model.heads(images)
        probs = model.combined_probs(
            ce_logits, kd_logits, alpha=SELECTION_ALPHA, beta=SELECTION_BETA
        )
        return probs.float(), features.float()
    output = model.student(images)
    return output.logits.float().softmax(dim=-1), output.embedding.float()


@torch.no_grad()
def predict_pool(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    strategy: Any = None,
) -> PoolOutputs:
    """The model's :class:`PoolOutputs` on ``dataset`` (items ``(image, dataset_index)``).

    Args:
        model: the trained module (put in eval mode here).
        dataset: the pool, without augmentation.
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        strategy: the trainer's strategy (``trainer.strategy``): its device, ranks and
            process group; ``None`` runs on the CPU in one process.

    Returns:
        the outputs of the whole dataset, ordered by dataset index, the same on every rank.
    """
    world_size = getattr(strategy, "world_size", 1)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=strategy.global_rank, shuffle=False
        )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    device = getattr(strategy, "root_device", torch.device("cpu"))
    model = model.to(device).eval()
    indices, probs, features = [], [], []
    for images, index in loader:
        p, f = run_model(model, images.to(device))
        indices.append(index.to(device))
        probs.append(p)
        features.append(f)
    local = PoolOutputs(torch.cat(indices), torch.cat(probs), torch.cat(features))
    return merge_shards(gather_shards(local, strategy))


def gather_shards(local: PoolOutputs, strategy: Any = None) -> list[PoolOutputs]:
    """Every rank's :class:`PoolOutputs`, rank by rank; ``[local]`` on one process.

    Each rank's shard has the same length (the :class:`DistributedSampler` pads), as
    ``all_gather`` needs.
    """
    world_size = getattr(strategy, "world_size", 1)
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return [local]
    gathered = []
    for tensor in (local.indices, local.probs, local.features):
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        gathered.append(parts)
    return [PoolOutputs(*parts) for parts in zip(*gathered, strict=True)]


def merge_shards(shards: Sequence[PoolOutputs]) -> PoolOutputs:
    """The shards' union ordered by dataset index, each index once, on the CPU.

    Repeated indices are the sampler's padding (the same image through the same model); the first
    occurrence is kept.
    """
    indices = torch.cat([s.indices for s in shards]).cpu()
    probs = torch.cat([s.probs for s in shards]).cpu()
    features = torch.cat([s.features for s in shards]).cpu()
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    keep = order[first]
    return PoolOutputs(indices[keep], probs[keep], features[keep])
