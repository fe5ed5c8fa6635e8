"""What a teacher-output cache was built from, and the check that a run matches it.

The manifest records the teacher (architecture, sha256 of its weight file, classes, embedding
width), the data (datamodule class and the settings that change the training images, a
fingerprint of the training transform pipeline, a fingerprint of the training samples: their
ids, labels and pixels or files), the augment seed, the number of epochs, the logits encoding,
the outputs stored and the shards. :func:`differences` lists every field in which a run differs
from a manifest: a stale cache is refused with all of them named in one line, never used.
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
    file names and sizes of image files, which are not read)."""
    ids = np.asarray(dataset.sample_ids, dtype=np.int64)
    digest = hashlib.sha256(ids.tobytes())
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


def data_record(datamodule: Any) -> dict[str, Any]:
    """The data fields of a manifest, from a set-up classification datamodule."""
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
            "transforms_sha256": hashlib.sha256(repr(dataset.transform).encode()).hexdigest(),
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
