"""Common image corruptions at five severities, and corrupted copies of test sets on disk.

The 15 corruptions of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261), with
the CIFAR-10-C parameter tables of the reference generator (``make_cifar_c.py`` in
``hendrycks/robustness``), which are calibrated for 32x32 images; see
:mod:`kdzoo.corruptions.functions` for the port and its few deliberate differences.

Why not the ``imagecorruptions`` package (Michaelis et al., arXiv:1907.07484): version 1.1.2
(2020) does not import on this stack (it needs ``pkg_resources``, gone from setuptools >= 81, and
``np.float_``, gone from numpy 2; ``skimage``'s ``multichannel`` argument, gone in 0.19, breaks
glass blur); its maintained fork ``imagecorruptions-imaug`` works but depends on
``opencv-python``, which installs a second ``cv2`` over albumentations' ``opencv-python-headless``,
plus numba and scikit-image; both refuse images under 32 pixels, and both use the ImageNet-C
parameters (made for 224-pixel images: a 10..20-pixel motion blur, a 3..10-pixel defocus disk),
which on 28/32-pixel images are far harsher than CIFAR-10-C.

On disk (:func:`write_corruption_set`), the layout of RobustBench (Croce et al., "RobustBench: a
standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and Benchmarks,
arXiv:2010.09670) for CIFAR-10-C: ``<out_dir>/<name>/<corruption>.npy``, uint8
``(5 * N, H, W, C)`` with severities 1..5 stacked in order, and ``labels.npy`` (``5 * N`` int64:
the labels repeated per severity), plus ``kdzoo_corruptions.json`` recording how the set was made
and the mean pixel distance to the clean images per corruption and severity.
:class:`kdzoo.datamodules.CorruptionStream` reads it. The command line is
``python -m kdzoo.corruptions`` (or ``python tools/make_corruptions.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from kdzoo.corruptions.functions import FUNCTIONS
from kdzoo.errors import KDZooError

__all__ = [
    "CORRUPTIONS",
    "METADATA_FILE",
    "SEVERITIES",
    "CorruptionError",
    "corrupt",
    "write_corruption_set",
]

#: The benchmark order (RobustBench, the continual TTA protocol): noise, blur, weather, digital.
CORRUPTIONS: tuple[str, ...] = tuple(FUNCTIONS)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
METADATA_FILE = "kdzoo_corruptions.json"
MIN_SIDE = 8


class CorruptionError(KDZooError, ValueError):
    """A bad corruption name, severity, image array or output folder."""


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise CorruptionError(
            f"images must be a uint8 array (N, H, W, C), got {getattr(images, 'dtype', None)} "
            f"{shape}"
        )
    _, h, w, c = images.shape
    if c not in (1, 3):
        raise CorruptionError(f"images must have 1 or 3 channels (last axis), got {c}")
    if min(h, w) < MIN_SIDE:
        raise CorruptionError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")


def _check_name(name: str) -> None:
    if name not in FUNCTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")


def _check_severity(severity: int) -> None:
    if severity not in SEVERITIES:
        raise CorruptionError(f"severity must be one of 1..5, got {severity!r}")


def corrupt(
    images: np.ndarray,
    name: str,
    severity: int,
    seed: int = 0,
    *,
    frost_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Corrupt uint8 ``(N, H, W, C)`` images (``C`` 1 or 3) with one corruption at one severity.

    Deterministic: image ``i`` draws its randomness from its own generator seeded with
    ``(seed, corruption index, severity, i)``, so the result for an image depends only on these,
    not on the other images, the order of the calls or the number of processes. Values are
    truncated to uint8 as the reference generator does.

    Args:
        images: the clean images; grey images are corrupted as one channel (see
            :mod:`kdzoo.corruptions.functions`).
        name: one of :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (strong).
        seed: a non-negative integer.
        frost_dir: folder holding the frost photographs ``frost1.png`` ... ``frost5.jpg`` of the
            reference code; ``None`` uses the procedural stand-in.
    """
    _check_images(images)
    _check_name(name)
    _check_severity(severity)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
    function = FUNCTIONS[name]
    key = CORRUPTIONS.index(name)
    frost = None if frost_dir is None else str(frost_dir)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([int(seed), key, severity, i])
        result = function(image.astype(np.float64), severity, rng, frost_dir=frost)
        out[i] = np.clip(result, 0, 255).astype(np.uint8).reshape(image.shape)
    return out


# -- writing a set -------------------------------------------------------------------------------

_WORKER_IMAGES: np.ndarray | None = None


def _init_worker(images: np.ndarray, worker_process: bool = True) -> None:
    global _WORKER_IMAGES
    _WORKER_IMAGES = images
    if worker_process:
        cv2.setNumThreads(1)  # one process per core: no nested threading


def _job(args: tuple[str, int, int, str | None]) -> tuple[np.ndarray, float]:
    name, severity, seed, frost_dir = args
    assert _WORKER_IMAGES is not None
    start = time.perf_counter()
    out = corrupt(_WORKER_IMAGES, name, severity, seed, frost_dir=frost_dir)
    return out, time.perf_counter() - start


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_corruption_set(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    out_dir: str | os.PathLike,
    name: str,
    severities: Sequence[int] = SEVERITIES,
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    *,
    overwrite: bool = False,
    workers: int = 1,
    frost_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write corrupted copies of ``images`` as ``<out_dir>/<name>/`` in the RobustBench layout.

    Every ``<corruption>.npy`` is uint8 ``(len(severities) * N, H, W, C)``, the severities
    stacked in the order given (1..5 by default, the RobustBench layout; ``C`` as in
    ``images``); ``labels.npy`` is int64, ``labels`` repeated once per severity;
    ``kdzoo_corruptions.json`` records the arguments, the parameters' origin and the mean
    absolute pixel distance to the clean images per corruption and severity (``distance``).

    The set is built in a hidden temporary folder beside the target and renamed into place when
    complete, so an interrupted run never leaves a partial set behind.

    Args:
        images: clean uint8 ``(N, H, W, C)`` images, ``C`` 1 or 3.
        labels: ``N`` non-negative integer labels.
        out_dir: parent folder (created if needed).
        name: the set's folder name, e.g. ``"FashionMNIST-C"``.
        severities: distinct severities in 1..5, in the order to stack them.
        corruptions: names from :data:`CORRUPTIONS`, one file each.
        seed: see :func:`corrupt`.
        overwrite: replace an existing non-empty ``<out_dir>/<name>``; without it that is an
            error.
        workers: processes (the jobs are the (corruption, severity) pairs; results do not depend
            on this).
        frost_dir: see :func:`corrupt`.
        progress: called with one line per finished corruption (e.g. ``print``).

    Returns:
        The folder written.
    """
    _check_images(images)
    labels = np.asarray(labels)
    if (
        labels.ndim != 1
        or len(labels) != len(images)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise CorruptionError(
            f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
        )
    if len(labels) and labels.min() < 0:
        raise CorruptionError("labels must be non-negative")
    severities, corruptions = [int(s) for s in severities], list(corruptions)
    for s in severities:
        _check_severity(s)
    for c in corruptions:
        _check_name(c)
    if not severities or len(set(severities)) != len(severities):
        raise CorruptionError(f"severities must be distinct and non-empty, got {severities}")
    if not corruptions or len(set(corruptions)) != len(corruptions):
        raise CorruptionError(f"corruptions must be distinct and non-empty, got {corruptions}")
    if workers < 1:
        raise CorruptionError(f"workers must be >= 1, got {workers}")
    if not name or Path(name).name != name or name.startswith("."):
        raise CorruptionError(f"name must be a plain folder name, got {name!r}")
    out_dir = Path(out_dir).expanduser()
    target = out_dir / name
    if _is_nonempty_dir(target) and not overwrite:
        raise CorruptionError(
            f"{target} already exists and is not empty; pass overwrite=True (--overwrite) to "
            "replace it"
        )
    if target.exists() and not target.is_dir():
        raise CorruptionError(f"{target} exists and is not a folder")
    if frost_dir is not None and not Path(frost_dir).is_dir():
        raise CorruptionError(f"frost_dir {frost_dir} is not a folder")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the finished set private
    frost = None if frost_dir is None else str(Path(frost_dir).resolve())
    jobs = [(c, s, seed, frost) for c in corruptions for s in severities]
    distance: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    try:
        if workers == 1:
            _init_worker(images, worker_process=False)
            results = map(_job, jobs)
            pool = None
        else:
            # spawn: never fork a parent that may hold torch / OpenMP threads
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(images,),
            )
            results = pool.map(_job, jobs)
        try:
            clean = images.astype(np.int16)
            for c in corruptions:
                stack, seconds = [], 0.0
                for s in severities:
                    out, elapsed = next(results)
                    stack.append(out)
                    seconds += elapsed
                    distance.setdefault(c, {})[str(s)] = float(np.abs(out - clean).mean())
                np.save(tmp / f"{c}.npy", np.concatenate(stack))
                if progress is not None:
                    row = " ".join(f"{distance[c][str(s)]:6.2f}" for s in severities)
                    progress(f"{c:<18} {row}   ({seconds:.1f} s of work)")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        np.save(tmp / "labels.npy", np.tile(labels.astype(np.int64), len(severities)))
        metadata = {
            "generator": "kdzoo.corruptions",
            "parameters": "CIFAR-10-C tables of make_cifar_c.py (Hendrycks & Dietterich, 2019)",
            "corruptions": corruptions,
            "severities": severities,
            "seed": seed,
            "num_images": len(images),
            "image_shape": list(images.shape[1:]),
            "frost": "procedural stand-in" if frost is None else frost,
            "seconds": round(time.perf_counter() - started, 1),
            "distance": distance,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing an old set only if ``overwrite``."""
    old = None
    if target.exists():
        if _is_nonempty_dir(target) and not overwrite:  # appeared while we were working
            raise CorruptionError(f"{target} appeared while writing; not replaced")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
