"""A teacher whose outputs are read from a cache instead of computed.

:class:`CachedTeacher` stands where a :class:`~kdzoo.models.teacher.Teacher` would: a method calls
it on the student's batch and gets the teacher's outputs for that batch's samples in the current
epoch (the ids come with the batch, as its last item, with ``--data.init_args.augment_seed``; the
module tells the cache which ids and epoch before each training step,
:meth:`CachedTeacher.select_batch`). The network is never built and its weights never loaded.
It is opened from ``teacher.cache`` (a field of :class:`~kdzoo.models.teacher.TeacherSpec`, and
of :class:`~kdzoo.methods.crossmodal.kd.PairedTeacherSpec` for a cross-modal teacher, whose
network returns bare logits: ``logits_only``) and checked twice: at construction against the
teacher the run names (weights sha256, architecture, classes) and the outputs the method needs,
and when fit starts against the run's data and epochs (:meth:`CachedTeacher.check_run`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from kdzoo.cache.manifest import check_format, data_record, differences, weights_sha256
from kdzoo.cache.store import MANIFEST, CacheError, read_json, read_shard, restore_logits
from kdzoo.models.backbone import BackboneOutput

__all__ = ["CachedTeacher", "open_manifest"]


def open_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the complete cache in ``directory`` (a :class:`CacheError` otherwise)."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    if not path.is_file():
        partial = any(directory.glob("*.safetensors")) if directory.is_dir() else False
        raise CacheError(
            f"{directory} is not a teacher cache"
            + (" (its build did not finish: rerun kdzoo cache build to resume it)" if partial
               else ": build one with kdzoo cache build -c RUN.yaml --epochs E --out DIR")
        )  # fmt: skip
    manifest = read_json(path)
    check_format(manifest, directory)
    return manifest


class CachedTeacher(nn.Module):
    """The stored outputs of a teacher, looked up by sample id and epoch.

    Args:
        directory: the cache (made by ``kdzoo cache build``).
        weights: the run's ``teacher.weights``: its file must be the one the cache was built from.
        name: the run's ``teacher.name`` (``None``: the cache's architecture).
        num_classes: the classes of the run's data.
        needs: the outputs the method reads (``logits``, ``embedding_norm``, ``*_class_means``).
        method: the method's name, for the messages.
        logits_only: return the logits tensor, as a cross-modal network does, instead of a
            :class:`~kdzoo.models.backbone.BackboneOutput`, as a timm classifier teacher does.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        weights: str | None,
        name: str | None,
        num_classes: int,
        needs: Iterable[str],
        method: str,
        logits_only: bool = False,
    ) -> None:
        super().__init__()
        self.directory = Path(directory).expanduser()
        self.manifest = open_manifest(self.directory)
        teacher = self.manifest["teacher"]
        expected = {
            "teacher": {
                "architecture": _untagged(name) if name else teacher["architecture"],
                "weights_sha256": weights_sha256(weights),
                "num_classes": num_classes,
            }
        }
        self._refuse_differences(expected)
        missing = [need for need in needs if need not in self.manifest["outputs"]]
        if missing:
            raise CacheError(
                f"{method} needs {', '.join(missing)} from the teacher, which the cache "
                f"{self.directory} does not hold (it has {', '.join(self.manifest['outputs'])}): "
                f"build a cache from a {method} run config"
            )
        self.name: str = teacher["architecture"]
        self.embedding_dim: int | None = teacher.get("embedding_dim")  # none: cross-modal
        self.num_classes: int = teacher["num_classes"]
        self.logits_only = logits_only
        self._epoch: int | None = None
        self._stored: dict[str, torch.Tensor] = {}
        self._rows_of = torch.empty(0, dtype=torch.int64)
        self._ids: torch.Tensor | None = None
        rank_zero_info(
            f"Teacher outputs come from the cache {self.directory}: the {self.name} teacher "
            f"({teacher['parameters'] / 1e6:.2f} M parameters, "
            f"{teacher['parameter_bytes'] / 2**20:.1f} MiB) is not built."
        )

    # ---- checks -------------------------------------------------------------------------------
    def _refuse_differences(self, expected: dict[str, Any]) -> None:
        found = differences(expected, self.manifest)
        if found:
            raise CacheError(
                f"the teacher cache {self.directory} was built for another run: "
                + "; ".join(found)
                + ". Rebuild it for this run (kdzoo cache build) or fix the run"
            )

    def check_run(self, datamodule: Any, max_epochs: int | None) -> None:
        """Refuse a run whose data, transforms, augment seed or epochs the cache does not match."""
        if getattr(datamodule, "train", None) is None or not hasattr(
            datamodule.train, "sample_ids"
        ):
            raise CacheError(
                "a teacher cache needs a kdzoo classification or paired-modality datamodule "
                "with --data.init_args.augment_seed set"
            )
        expected = {"data": data_record(datamodule)}
        if max_epochs is not None and max_epochs > 0:
            expected["epochs"] = max_epochs
        self._refuse_differences(expected)

    # ---- lookup -------------------------------------------------------------------------------
    def select_batch(self, batch: Any, epoch: int, *, items: int) -> None:
        """Select the samples of a training batch that carries their ids as its last item, the
        ``items``-th: ``(images, targets, ids)`` (3) or ``(x_m1, x_m2, y, ids)`` (4)."""
        if not isinstance(batch, Sequence) or len(batch) < items:
            raise CacheError(
                "a teacher cache needs training batches that carry the sample ids: set "
                "--data.init_args.augment_seed to the cache's augment seed"
            )
        self.select(batch[items - 1], epoch)

    def select(self, ids: torch.Tensor, epoch: int) -> None:
        """The samples (ids) and epoch of the next call."""
        if epoch != self._epoch:
            self._load_epoch(epoch)
        self._ids = ids

    def _load_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.manifest["epochs"]:
            raise CacheError(
                f"epoch {epoch} is not in the teacher cache {self.directory}, which holds "
                f"{self.manifest['epochs']} epochs: set --trainer.max_epochs to at most "
                f"{self.manifest['epochs']}, or build a cache with more epochs"
            )
        shards = [s for s in self.manifest["shards"] if s["epoch"] == epoch]
        parts = [read_shard(self.directory, info) for info in shards]
        self._stored = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        ids = self._stored.pop("ids").long()
        for name in [n for n in self._stored if n.startswith("stat/")]:
            del self._stored[name]
        self._rows_of = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
        self._rows_of[ids] = torch.arange(len(ids))
        self._epoch = epoch

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor, indices: Any = None) -> BackboneOutput | torch.Tensor:
        """The outputs for the selected samples, on the device of the (first) input, which only
        gives the batch size and the device: the teacher is not run."""
        x = inputs[0]
        if indices is not None:
            raise CacheError(
                "the teacher cache holds no intermediate feature maps: this method needs the "
                "live teacher (remove teacher.cache)"
            )
        if self._ids is None:
            raise CacheError(
                "a cached teacher is read only in training steps, whose batches carry the sample "
                "ids (--data.init_args.augment_seed)"
            )
        ids = self._ids.detach().cpu().long()
        if len(ids) != len(x):
            raise CacheError(f"{len(x)} images but {len(ids)} sample ids in the batch")
        rows = self._rows_of[ids.clamp(max=len(self._rows_of) - 1)]
        if (ids >= len(self._rows_of)).any() or (rows < 0).any():
            raise CacheError(
                f"samples of this batch are not in the teacher cache {self.directory}: it was "
                "built from other data"
            )
        picked = {name: t[rows] for name, t in self._stored.items()}
        logits = restore_logits(picked, self.num_classes).to(x.device)
        if self.logits_only:
            return logits
        norm = picked.get("embedding_norm")
        return BackboneOutput(
            logits=logits,
            embedding=None,
            embedding_norm=None if norm is None else norm.float().to(x.device),
        )

    def statistic(self, name: str) -> torch.Tensor:
        """A class-mean table over epoch 0's views (``embedding_class_means``,
        ``softmax_class_means``), float64."""
        if name not in self.manifest["outputs"]:
            raise CacheError(f"the teacher cache {self.directory} holds no {name}")
        return read_shard(self.directory, self.manifest["statistics"])[name]


def _untagged(name: str) -> str:
    return name.split(".", 1)[0]
