"""How teacher outputs are stored: logits encoding, shards and the manifest on disk.

A cache directory holds ``manifest.json`` (written last, when every shard is there), one
safetensors shard per (epoch, chunk of samples) with a ``.json`` sidecar giving its rows, size
and sha256 (a build resumes from the shards whose sidecar matches), and ``statistics.safetensors``
(class-mean tables over epoch 0's views). Shards are read whole and checked against their size
and sha256 first: a truncated or corrupt shard is an error, never silently read.

Logits: with at most :data:`FULL_LOGITS_MAX_CLASSES` classes every logit is stored (fp16, or fp32
with ``--dtype float32``: see :data:`DTYPES`). Above
it, the ``k`` largest logits and their class indices, plus one "rest" logit: the value that, given
to each of the other ``C - k`` classes, keeps their total probability (at temperature 1) what the
teacher gave them, ``rest = logsumexp(z_rest) - log(C - k)``. Softmax of the restored vector is
FKD's marginal smoothing (the top-k probabilities kept, the remaining mass spread uniformly over
the other classes; Shen and Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022, arXiv:2112.01528, github.com/szq0214/FKD); storing it as logits lets
every loss apply its own temperature.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kdzoo.errors import KDZooError

__all__ = [
    "DEFAULT_TOP_K",
    "DTYPES",
    "FULL_LOGITS_MAX_CLASSES",
    "MANIFEST",
    "CacheError",
    "CacheOccupiedError",
    "encode_logits",
    "index_dtype",
    "read_json",
    "read_shard",
    "restore_logits",
    "sha256_file",
    "shard_name",
    "write_json",
    "write_shard",
]

MANIFEST = "manifest.json"
#: Every logit is kept up to this many classes: CIFAR-100 costs 200 bytes per sample-epoch in
#: fp16, as much as top-k storage would save nothing worth an approximation; above it (ImageNet's
#: 1,000 classes: 2,000 bytes per sample-epoch, 25.6 TB for 100 epochs) top-k storage.
FULL_LOGITS_MAX_CLASSES = 100
#: ``k`` of top-k storage (FKD keeps the top classes of each soft label the same way).
DEFAULT_TOP_K = 10
#: Value types of the stored logits and embedding norms. fp16 (the default) halves the size; its
#: rounding (2^-11 relative) is enough to make SGD follow another trajectory after a few dozen
#: steps, as any perturbation of that size would (a student trained from an fp16 cache ends
#: within seed-to-seed noise of the live one, not equal to it). fp32 holds exactly what the live
#: teacher computes, so a student trained from it is bit-identical to one trained live
#: (on CPU; cuDNN's batch-size-dependent kernels may differ in the last bits).
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CacheError(KDZooError):
    """A teacher-output cache that cannot be used: missing, corrupt, stale or incomplete."""


class CacheOccupiedError(CacheError):
    """The directory of a build already holds a cache (or unfinished build) of another run."""


def index_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type holding every class id."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def encode_logits(
    logits: torch.Tensor, k: int | None, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """``(N, C)`` logits as stored in ``dtype``: ``{"logits"}`` when ``k`` is None, else
    ``{"topk_values", "topk_indices", "rest_logit"}`` (see the module docstring)."""
    logits = logits.float()
    if k is None:
        return {"logits": logits.to(dtype)}
    num_classes = logits.shape[1]
    values, indices = logits.topk(k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    rest_logit = rest.logsumexp(dim=1) - torch.log(torch.tensor(float(num_classes - k)))
    return {
        "topk_values": values.to(dtype),
        "topk_indices": indices.to(index_dtype(num_classes)),
        "rest_logit": rest_logit.to(dtype),
    }


def restore_logits(stored: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """The float32 ``(N, C)`` logits :func:`encode_logits` stored."""
    if "logits" in stored:
        return stored["logits"].float()
    values, indices = stored["topk_values"].float(), stored["topk_indices"].long()
    restored = stored["rest_logit"].float()[:, None].expand(-1, num_classes).clone()
    return restored.scatter(1, indices, values)


def shard_name(epoch: int, chunk: int) -> str:
    return f"epoch{epoch:04d}-chunk{chunk:05d}.safetensors"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file and rename it: a reader (or a resumed build) never
    sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    _atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path}: {err}") from None


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one shard and its sidecar; return the sidecar (``rows``, ``bytes``, ``sha256``)."""
    data = save_safetensors({name: t.contiguous() for name, t in tensors.items()})
    _atomic_write(path, data)
    info = {
        "file": path.name,
        "rows": int(tensors["ids"].numel()),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json(path.with_suffix(".json"), info)
    return info


def read_shard(directory: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the shard ``info`` describes, after checking its size and sha256."""
    path = directory / info["file"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CacheError(
            f"teacher cache {directory}: shard {info['file']} is missing or unreadable ({err}): "
            "rebuild the cache (kdzoo cache build)"
        ) from None
    problem = None
    if len(data) != info["bytes"]:
        problem = f"has {len(data)} bytes, the manifest says {info['bytes']} (truncated?)"
    elif hashlib.sha256(data).hexdigest() != info["sha256"]:
        problem = "does not match its sha256 in the manifest (corrupt)"
    if problem:
        raise CacheError(
            f"teacher cache {directory}: shard {info['file']} {problem}: rebuild the cache "
            "(kdzoo cache build --out to a new directory, or delete this one)"
        )
    return load_safetensors(data)
