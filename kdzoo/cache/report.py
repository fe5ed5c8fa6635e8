"""``kdzoo cache info`` and ``kdzoo cache verify``: what a cache holds, and whether it is right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdzoo.cache.build import plan_manifest, teacher_adapter
from kdzoo.cache.manifest import differences
from kdzoo.cache.store import CacheError, read_shard, restore_logits
from kdzoo.cache.teacher import open_manifest

__all__ = ["bytes_per_sample_epoch", "describe", "verify"]

#: How far (relative) a stored value may be from the recomputed one: fp16 keeps 11 significant
#: bits (2^-11); fp32 stores what the teacher computed, up to the last bits in which a kernel
#: for another batch size may differ.
RELATIVE = {"float16": 2.0**-11, "float32": 1e-5}


def bytes_per_sample_epoch(manifest: dict[str, Any]) -> float:
    """Shard bytes per stored (sample, epoch), headers included."""
    entries = manifest["data"]["samples"] * manifest["epochs"]
    return sum(s["bytes"] for s in manifest["shards"]) / entries


def describe(directory: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """The manifest in a few lines, with the size on disk."""
    directory = Path(directory).expanduser()
    manifest = manifest or open_manifest(directory)
    teacher, data, logits = manifest["teacher"], manifest["data"], manifest["logits"]
    on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    stored = (
        f"every logit, {logits['dtype']}"
        if logits["stored"] == "full"
        else f"top-{logits['k']} logits ({logits['dtype']}, indices {logits['index_dtype']}) "
        "+ one rest logit"
    )
    lines = [
        f"teacher cache {directory} (format version {manifest['version']}, kdzoo "
        f"{manifest['kdzoo_version']})",
        f"  teacher:      {teacher['architecture']}, {teacher['num_classes']} classes, weights "
        f"{teacher['weights']} (sha256 {teacher['weights_sha256'][:16]}...)",
        f"  data:         {data['class']}, {data['samples']} training samples, augment_seed "
        f"{data['augment_seed']}",
        f"  settings:     {data['settings']}",
        f"  epochs:       {manifest['epochs']}",
        f"  logits:       {stored}",
        f"  outputs:      {', '.join(manifest['outputs'])}",
        f"  shards:       {len(manifest['shards'])} of up to {manifest['chunk_size']} samples",
        f"  size on disk: {on_disk:,} bytes ({on_disk / 2**20:.2f} MiB), "
        f"{bytes_per_sample_epoch(manifest):.1f} bytes per sample-epoch",
    ]
    return "\n".join(lines)


@torch.no_grad()
def verify(
    directory: str | Path, model: Any, datamodule: Any, *, samples: int = 64, seed: int = 0
) -> str:
    """Check every shard's sha256, the run against the manifest, and ``samples`` random entries
    against the live teacher; raise :class:`CacheError` on any difference beyond the stored
    dtype's rounding."""
    directory = Path(directory).expanduser()
    manifest = open_manifest(directory)
    datamodule.prepare_data()
    datamodule.setup("fit")
    plan = plan_manifest(
        model,
        datamodule,
        epochs=manifest["epochs"],
        k=manifest["logits"]["k"],
        outputs=manifest["outputs"],
        chunk_size=manifest["chunk_size"],
        dtype=manifest["logits"]["dtype"],
    )
    found = differences({"teacher": plan["teacher"], "data": plan["data"]}, manifest)
    if found:
        raise CacheError(f"{directory} was built for another run: {'; '.join(found)}")
    shards = {(s["epoch"], s["chunk"]): read_shard(directory, s) for s in manifest["shards"]}
    dataset, size = datamodule.train, manifest["chunk_size"]
    generator = torch.Generator().manual_seed(seed)
    epochs = torch.randint(manifest["epochs"], (samples,), generator=generator).tolist()
    indices = torch.randint(len(dataset), (samples,), generator=generator).tolist()
    # A view is (*inputs, target, sample id): one image, or the two modalities of a pair.
    views = [dataset.view(i, e) for i, e in zip(indices, epochs, strict=True)]
    inputs = [torch.stack([v[k] for v in views]) for k in range(len(views[0]) - 2)]
    live = teacher_adapter(model).run(inputs)
    stored_rows = []
    for (i, e), (*_, sample_id) in zip(zip(indices, epochs, strict=True), views, strict=True):
        shard = shards[(e, i // size)]
        row = int((shard["ids"] == sample_id).nonzero()[0, 0])
        stored_rows.append(
            {k: v[row : row + 1] for k, v in shard.items() if not k.startswith("stat/")}
        )
    stored = {k: torch.cat([r[k] for r in stored_rows]) for k in stored_rows[0]}
    num_classes = manifest["teacher"]["num_classes"]
    restored = restore_logits(stored, num_classes)
    logits = live["logits"].float()
    if manifest["logits"]["k"] is None:
        compared, reference = restored, logits
    else:  # the top-k positions (the others hold the rest logit, by design)
        values, positions = logits.topk(manifest["logits"]["k"], dim=1)
        compared, reference = restored.gather(1, positions), values
    relative = RELATIVE[manifest["logits"]["dtype"]]
    worst = _check("logits", compared, reference, relative)
    report = [
        f"{len(shards)} shards match their size and sha256",
        f"{samples} random entries recomputed with the live teacher: largest |logit "
        f"difference| {worst:.3g}",
    ]
    if "embedding_norm" in stored:
        norm = _check(
            "embedding_norm",
            stored["embedding_norm"].float(),
            live["embedding"].norm(dim=1),
            relative,
        )
        report.append(f"largest |embedding norm difference| {norm:.3g}")
    return f"teacher cache {directory}: OK\n  " + "\n  ".join(report)


def _check(name: str, stored: torch.Tensor, live: torch.Tensor, relative: float) -> float:
    """Largest |stored - live|; an error beyond the stored dtype's rounding of the live values."""
    difference = (stored - live).abs()
    bound = live.abs().clamp(min=2.0**-14) * relative * 1.01
    if (difference > bound).any():
        raise CacheError(
            f"stored {name} differ from the live teacher's by up to {difference.max():.3g}, more "
            "than the stored dtype's rounding: the cache is stale or corrupt, rebuild it"
        )
    return float(difference.max())
