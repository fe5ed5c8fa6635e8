"""Building a teacher-output cache: a run's teacher over E epochs of its exact-replay views.

``kdzoo cache build -c run.yaml --epochs E --out DIR`` instantiates the run (its model, whose
teacher is built live, and its datamodule, which must set ``augment_seed``) and runs the teacher
over the training view of every sample in epochs ``0..E-1``: view ``(augment_seed, e, i)``, the
one training will see (:meth:`~kdzoo.datamodules.loading.TransformedDataset.view`; the same
item in every epoch for paired-modality data, :meth:`~kdzoo.datamodules.paired.PairedDataset.view`,
which is not augmented). The model says how its teacher is run and recorded through its
``cache_adapter()`` (:mod:`kdzoo.cache.adapters`: a timm classifier, or a cross-modal network
that gives logits only), so nothing here depends on the method. The work is
cut into units of (epoch, chunk of ``chunk_size`` samples), one shard each, written atomically
with a sidecar; a rerun after an interruption skips the units whose shard is complete. Under
DDP (``--trainer.devices N --trainer.strategy ddp``) rank ``r`` computes units ``r, r+N, ...``;
rank 0 writes the manifest last, when every shard is there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdzoo import __version__
from kdzoo.cache.adapters import OUTPUTS, TeacherAdapter
from kdzoo.cache.manifest import FORMAT, VERSION, data_record, differences
from kdzoo.cache.store import (
    DEFAULT_TOP_K,
    DTYPES,
    FULL_LOGITS_MAX_CLASSES,
    MANIFEST,
    CacheError,
    CacheOccupiedError,
    encode_logits,
    index_dtype,
    read_json,
    sha256_file,
    shard_name,
    write_json,
    write_shard,
)
from kdzoo.cache.teacher import CachedTeacher
from kdzoo.models.teacher import CACHE_READERS

__all__ = ["OUTPUTS", "build_cache", "plan_manifest", "teacher_adapter"]

PLAN = "build.json"
STATISTICS = "statistics.safetensors"
DEFAULT_CHUNK = 8192
_STATISTICS = {"embedding_class_means": "embedding", "softmax_class_means": "softmax"}


def plan_manifest(
    model: Any,
    datamodule: Any,
    *,
    epochs: int,
    k: int | None = None,
    outputs: Sequence[str] = (),
    chunk_size: int = DEFAULT_CHUNK,
    dtype: str = "float16",
) -> dict[str, Any]:
    """The manifest of the cache of ``model``'s teacher over ``datamodule``, without shards."""
    adapter = teacher_adapter(model)
    if getattr(datamodule.train, "augment_seed", None) is None:
        raise CacheError(
            "kdzoo cache build needs exact-replay views: set --data.init_args.augment_seed S "
            "(and the same S when training from the cache)"
        )
    num_classes = adapter.num_classes
    if k is not None and not 0 < k < num_classes:
        raise CacheError(f"--k must be in 1..{num_classes - 1}, got {k}")
    if dtype not in DTYPES:
        raise CacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if k is None and num_classes > FULL_LOGITS_MAX_CLASSES:
        k = DEFAULT_TOP_K
    wanted = ["logits", *getattr(model, "teacher_outputs", ()), *outputs]
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise CacheError(f"unknown cache outputs {unknown}: choose from {', '.join(OUTPUTS)}")
    unavailable = [o for o in OUTPUTS if o in wanted and o not in adapter.outputs]
    if unavailable:
        raise CacheError(
            f"the teacher of {type(model).__name__} gives only {', '.join(adapter.outputs)}, not "
            f"{', '.join(unavailable)}: leave them out of --outputs"
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "kdzoo_version": __version__,
        "teacher": adapter.record(),
        "data": data_record(datamodule),
        "epochs": epochs,
        "logits": {
            "stored": "full" if k is None else "topk",
            "k": k,
            "dtype": dtype,
            "index_dtype": None if k is None else str(index_dtype(num_classes)).split(".")[-1],
        },
        "outputs": [o for o in OUTPUTS if o in wanted],
        "chunk_size": chunk_size,
    }


def teacher_adapter(model: Any) -> TeacherAdapter:
    """How ``model``'s live teacher is run and recorded (its ``cache_adapter()``)."""
    if isinstance(getattr(model, "teacher", None), CachedTeacher):
        raise CacheError(
            "this run reads its teacher from a cache (teacher.cache is set): remove "
            "--model.init_args.teacher.cache to build a cache from the live teacher"
        )
    make = getattr(model, "cache_adapter", None)
    if make is None:
        raise CacheError(
            f"{type(model).__name__} has no teacher to cache: kdzoo cache build takes the run "
            f"config of a method that reads a teacher cache ({', '.join(CACHE_READERS)}) with "
            "its --model.init_args.teacher"
        )
    return make()


def _same_build(plan: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Fields in which an existing cache or unfinished build differs from ``plan``."""
    keys = ("teacher", "data", "epochs", "logits", "outputs", "chunk_size", "version")
    diff = differences({k: plan[k] for k in ("teacher", "data")}, found)
    diff += [
        f"{k} (cache {found.get(k)}, run {plan[k]})" for k in keys[2:] if found.get(k) != plan[k]
    ]
    return diff


def prepare_directory(out: Path, plan: dict[str, Any]) -> bool:
    """Check ``out`` can hold this build; ``False`` when the cache is already complete there.

    Nothing there is ever overwritten: a complete cache or an unfinished build of another run,
    or a directory holding other files, is an error.
    """
    for name, what, advice in (
        (MANIFEST, "already holds a teacher cache", "(nothing was overwritten)"),
        (PLAN, "holds an unfinished build", "or delete it"),
    ):
        if (out / name).is_file():
            diff = _same_build(plan, read_json(out / name))
            if diff:
                raise CacheOccupiedError(
                    f"{out} {what} of another run ({'; '.join(diff)}): choose another --out "
                    f"{advice}"
                )
            return name == PLAN  # a complete cache needs no work; an unfinished one resumes
    if out.exists() and any(out.iterdir()):
        raise CacheOccupiedError(
            f"{out} is not empty and holds no teacher cache: choose another --out"
        )
    return True


def units(plan: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """``(epoch, chunk, first sample index, samples)`` of every shard of ``plan``."""
    n, size = plan["data"]["samples"], plan["chunk_size"]
    return [
        (e, c, c * size, min(size, n - c * size))
        for e in range(plan["epochs"])
        for c in range(math.ceil(n / size))
    ]


def _complete(out: Path, epoch: int, chunk: int) -> dict[str, Any] | None:
    """The sidecar of a shard written whole (size and sha256 as recorded), else ``None``."""
    path = out / shard_name(epoch, chunk)
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    info = read_json(sidecar)
    if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
        return None
    return info


class _Views(Dataset):
    """The exact training views of the samples of some units: ``(*inputs, target, id, unit)``
    (one input, the image, for classification data; two for paired modalities)."""

    def __init__(self, dataset: Any, todo: Sequence[tuple[int, int, int, int]]) -> None:
        self.dataset = dataset
        self.items = [
            (u, e, i) for u, (e, _, start, n) in enumerate(todo) for i in range(start, start + n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> tuple[Any, ...]:
        unit, epoch, i = self.items[n]
        return (*self.dataset.view(i, epoch), unit)


class _UnitBatches(Sampler[list[int]]):
    """Batches that never cross a unit, so a unit's shard is written as soon as it is done."""

    def __init__(self, todo: Sequence[tuple[int, int, int, int]], batch_size: int) -> None:
        self.batch_size, self.drop_last = batch_size, False
        self.batches, position = [], 0
        for *_, n in todo:
            for s in range(0, n, batch_size):
                self.batches.append(list(range(position + s, position + min(s + batch_size, n))))
            position += n

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@torch.no_grad()
def run_units(
    fabric: L.Fabric,
    adapter: TeacherAdapter,
    dataset: Any,
    todo: Sequence[tuple[int, int, int, int]],
    plan: dict[str, Any],
    out: Path,
    *,
    batch_size: int,
    num_workers: int,
) -> None:
    """Run the teacher over this rank's units (``r, r + N, ...`` of ``todo``) and write one shard
    per unit as soon as its last batch is done."""
    mine = list(todo[fabric.global_rank :: fabric.world_size])
    loader = DataLoader(
        _Views(dataset, mine),
        batch_sampler=_UnitBatches(mine, batch_size),
        num_workers=num_workers,
    )
    adapter.to(fabric.device)
    pending: dict[str, list[torch.Tensor]] = {}
    for *inputs, targets, ids, unit in loader:
        with fabric.autocast():
            output = adapter.run([x.to(fabric.device) for x in inputs])
        measured = [(name, value.float()) for name, value in output.items()]
        for name, value in (("ids", ids), ("targets", targets), *measured):
            pending.setdefault(name, []).append(value.detach().cpu())
        epoch, chunk, _, n = mine[int(unit[0])]
        if sum(len(t) for t in pending["ids"]) == n:
            done = {name: torch.cat(values) for name, values in pending.items()}
            write_shard(out / shard_name(epoch, chunk), _shard(plan, epoch, done))
            pending = {}


def _shard(plan: dict[str, Any], epoch: int, done: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What one unit's shard holds: ids, the encoded logits, the embedding norms if wanted, and
    in epoch 0 the per-class sums of the class-mean tables (float64)."""
    # int32 ids: positions in a dataset, 4 bytes instead of 8 per sample-epoch.
    ids = done["ids"].to(torch.int32)
    dtype = DTYPES[plan["logits"]["dtype"]]
    tensors = {"ids": ids, **encode_logits(done["logits"], plan["logits"]["k"], dtype)}
    if "embedding_norm" in plan["outputs"]:
        tensors["embedding_norm"] = done["embedding"].norm(dim=1).to(dtype)
    if epoch == 0:
        classes, targets = plan["teacher"]["num_classes"], done["targets"].long()
        tensors["stat/count"] = torch.bincount(targets, minlength=classes).double()
        # No embedding from a teacher that gives logits only (its plan asks for no table of it).
        measured = {"embedding": done.get("embedding"), "softmax": done["logits"].softmax(dim=1)}
        for name, source in _STATISTICS.items():
            if name in plan["outputs"]:
                values = measured[source].double()
                sums = torch.zeros(classes, values.shape[1], dtype=torch.float64)
                tensors[f"stat/{source}_sum"] = sums.index_add_(0, targets, values)
    return tensors


def finish(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Write the statistics and the manifest once every shard is there (rank 0)."""
    from safetensors.torch import load_file

    shards = []
    for epoch, chunk, _, _ in units(plan):
        info = _complete(out, epoch, chunk)
        if info is None:
            raise CacheError(f"shard {shard_name(epoch, chunk)} is missing: rerun the build")
        shards.append({**info, "epoch": epoch, "chunk": chunk})
    manifest = {**plan, "shards": shards}
    wanted = [name for name in _STATISTICS if name in plan["outputs"]]
    if wanted:
        tables: dict[str, torch.Tensor] = {}
        parts = [load_file(str(out / s["file"])) for s in shards if s["epoch"] == 0]
        counts = sum(p["stat/count"] for p in parts)
        for name in wanted:
            sums = sum(p[f"stat/{_STATISTICS[name]}_sum"] for p in parts)
            tables[name] = sums / counts.clamp(min=1)[:, None]
        tables["ids"] = torch.zeros(0, dtype=torch.int64)  # write_shard counts rows by ids
        info = write_shard(out / STATISTICS, tables)
        manifest["statistics"] = info
    write_json(out / MANIFEST, manifest)
    (out / PLAN).unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp"):  # files an interrupted build was writing
        leftover.unlink(missing_ok=True)
    return manifest


def build_cache(
    model: Any,
    datamodule: Any,
    out: str | Path,
    *,
    epochs: int,
    trainer_options: dict[str, Any] | None = None,
    k: int | None = None,
    outputs: Sequence[str] = (),
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Build (or finish building) the cache of ``model``'s teacher in ``out``; its manifest.

    ``trainer_options`` (``accelerator``, ``devices``, ``strategy``, ``num_nodes``,
    ``precision``, as the run's trainer has them) say where the teacher runs (a
    :class:`lightning.Fabric`); each DDP rank writes its share of the shards.
    """
    if epochs < 1:
        raise CacheError(f"--epochs must be at least 1, got {epochs}")
    out = Path(out).expanduser()
    datamodule.prepare_data()
    datamodule.setup("fit")
    plan = plan_manifest(
        model, datamodule, epochs=epochs, k=k, outputs=outputs, chunk_size=chunk_size,
        dtype=dtype,
    )  # fmt: skip
    if not prepare_directory(out, plan):
        print(f"{out} already holds this cache ({epochs} epochs); nothing to do")
        return read_json(out / MANIFEST)
    out.mkdir(parents=True, exist_ok=True)
    # Every process computes the same list before the processes connect (nothing is written
    # in between), so the ranks agree on their shares.
    todo = [u for u in units(plan) if _complete(out, u[0], u[1]) is None]
    fabric = L.Fabric(**(trainer_options or {}))
    if fabric.global_rank == 0 and not (out / PLAN).is_file():
        write_json(out / PLAN, plan)
    fabric.launch()  # under DDP, starts the other ranks (which run this function up to here)
    if todo:
        batch_size = batch_size or datamodule.batch_size
        workers = datamodule.num_workers
        run_units(
            fabric, teacher_adapter(model), datamodule.train, todo, plan, out,
            batch_size=batch_size, num_workers=workers,
        )  # fmt: skip
    fabric.barrier()
    manifest = finish(out, plan) if fabric.global_rank == 0 else plan
    fabric.barrier()
    return manifest
