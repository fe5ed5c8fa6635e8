"""What a teacher-output cache was built from, and the check that a run matches it.

The manifest records the teacher (architecture, sha256 of its weight file, classes, embedding
width; what it records is its adapter's, :mod:`kdzoo.cache.adapters`), the data (datamodule
class and the settings that change the training images, a fingerprint of the training transform
pipeline, a fingerprint of the training samples: their ids, labels and pixels or files), the
augment seed, the number of epochs, the logits encoding, the outputs stored and the shards.
Paired-modality data (:class:`~kdzoo.datamodules.paired.PairedDataset`) has the same fields: its
"transforms" are the function that turns a stored pair into tensors (``prepare``), its samples
the rows of both modality arrays and of the labels. :func:`differences` lists every field in
which a run differs from a manifest: a stale cache is refused with all of them named in one line,
never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdzoo.cache.store import CacheError, sha256_file
from kdzoo.models.teacher import RANDOM_INIT, TIMM_PRETRAINED, resolve_weights

__all__ = [
    "FORMAT",
    "VERSION",
    "data_record",
    "differences",
    "weights_sha256",
]

FORMAT = "kdzoo-teacher-cache"
VERSION = 1
# Datamodule settings that do not change which training images are seen, nor how.
_NOT_TRAINING_DATA = (
    "root",
    "batch_size",
    "num_workers",
    "download",
    "eval_subset",
    "predict_split",
    "augment_seed",  # recorded on its own
)
# The fields a run must share with the cache (epochs: the run may use fewer).
COMPARED = ("teacher.architecture", "teacher.weights_sha256", "teacher.num_classes", "data")


def weights_sha256(weights: str | None, field: str = "teacher") -> str:
    """sha256 of the weight file behind ``weights`` (a path, an exported folder or hub:NAME)."""
    if weights in (None, RANDOM_INIT, TIMM_PRETRAINED):
        raise CacheError(
            f"a teacher cache needs the {field}'s weights in a file, got {field}.weights="
            f"{weights}: set --model.init_args.{field}.weights to a checkpoint, an exported "
            "folder or hub:NAME"
        )
    path, _ = resolve_weights(weights)
    try:
        return sha256_file(Path(path))
    except OSError as err:
        raise CacheError(f"cannot read the {field} weights {path}: {err}") from None


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over the training samples' ids, labels and content (pixels of in-memory images;
    file names and sizes of image files, which are not read; the stored rows of both modalities
    and the labels of paired data)."""
    ids = np.asarray(dataset.sample_ids, dtype=np.int64)
    digest = hashlib.sha256(ids.tobytes())
    if hasattr(dataset, "prepare"):  # paired modalities
        for array in (dataset.m1, dataset.m2, dataset.labels):
            _hash_rows(digest, array, ids)
        return digest.hexdigest()
    digest.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    if hasattr(dataset, "images"):
        digest.update(np.ascontiguousarray(dataset.images[ids]).tobytes())
    elif hasattr(dataset, "paths"):
        for path in dataset.paths:
            digest.update(f"{Path(path).parent.name}/{Path(path).name}|".encode())
            digest.update(str(Path(path).stat().st_size).encode())
    else:
        for j in range(len(ids)):
            digest.update(np.ascontiguousarray(dataset.load_image(int(ids[j]))).tobytes())
    return digest.hexdigest()


def _hash_rows(digest: Any, array: Any, ids: np.ndarray, chunk: int = 4096) -> None:
    """Add the rows ``ids`` of ``array`` (an array, a memory map, or anything indexed by an
    integer), with their dtype and shape, to ``digest``; row by row or in chunks, the bytes are
    the same."""
    if len(ids):
        first = np.asarray(array[int(ids[0])])
        digest.update(f"{first.dtype.str}{first.shape}|".encode())
    if isinstance(array, np.ndarray):
        for start in range(0, len(ids), chunk):
            digest.update(np.ascontiguousarray(array[ids[start : start + chunk]]).tobytes())
    else:
        for j in ids:
            digest.update(np.ascontiguousarray(np.asarray(array[int(j)])).tobytes())


def _describe_function(function: Any) -> str:
    """A description of a paired dataset's ``prepare`` that is the same in every process: a
    function's qualified name, or a callable object's class and attributes (``repr`` would hold
    an address)."""
    if hasattr(function, "__qualname__"):
        return f"{function.__module__}.{function.__qualname__}"
    kind, state = type(function), getattr(function, "__dict__", {})
    plain = json.dumps(state, sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return f"{kind.__module__}.{kind.__qualname__}{plain}"


def _transforms(dataset: Any) -> str:
    """What turns a stored training sample into what the teacher sees."""
    if hasattr(dataset, "prepare"):  # paired modalities: not augmented
        return _describe_function(dataset.prepare)
    return repr(dataset.transform)


def data_record(datamodule: Any) -> dict[str, Any]:
    """The data fields of a manifest, from a set-up classification or paired-modality
    datamodule."""
    dataset = datamodule.train
    # Keys starting with "_" are LightningCLI's bookkeeping (class path, instantiator).
    settings = {
        k: v
        for k, v in dict(datamodule.hparams).items()
        if k not in _NOT_TRAINING_DATA and not k.startswith("_")
    }
    return _plain(
        {
            "class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "settings": settings,
            "transforms_sha256": hashlib.sha256(_transforms(dataset).encode()).hexdigest(),
            "samples_sha256": dataset_fingerprint(dataset),
            "samples": len(dataset),
            "augment_seed": getattr(dataset, "augment_seed", None),
        }
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def differences(expected: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """``"field (cache X, run Y)"`` for every compared field of the sections ``expected`` (the
    run) gives in which it differs from ``manifest``; ``epochs`` differs when the run needs
    more than were cached."""
    run, cached = _flatten(_plain(expected)), _flatten(manifest)
    # Only the sections the run gives (the teacher alone when a module is built, the data too
    # when fit starts).
    sections = tuple(f"{name}." for name in expected) + tuple(expected)
    found = []
    for key in sorted(set(run) | set(cached)):
        if not (key.startswith(COMPARED) and key.startswith(sections)):
            continue
        if run.get(key) != cached.get(key):
            found.append(f"{key} (cache {_short(cached.get(key))}, run {_short(run.get(key))})")
    if expected.get("epochs") is not None and expected["epochs"] > manifest.get("epochs", 0):
        found.append(f"epochs (cache {manifest.get('epochs')}, run {expected['epochs']})")
    return found


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def check_format(manifest: dict[str, Any], directory: Path) -> None:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{directory} is not a kdzoo teacher cache of version {VERSION} (format "
            f"{manifest.get('format')!r}, version {manifest.get('version')!r}): rebuild it with "
            "this kdzoo (kdzoo cache build)"
        )
