"""The files of a corruption benchmark, read for :class:`~kdzoo.datamodules.CorruptionStream`.

Two layouts (described in :mod:`kdzoo.datamodules.corruption_stream`): RobustBench's ``.npy``
sets, ``<corruption>.npy`` stacking the severities of one corruption with one ``labels.npy``, and
ImageNet-C's folders, ``<corruption>/<severity>/<wnid>/<image>``. Each block of the stream (one
corruption at one severity) is read from a *source* ``(file, keys, labels)``: a ``.npy`` path with
row indices, or ``None`` with image paths. :class:`StreamBatches` loads the stream's batches from
them. Malformed files raise a :class:`~kdzoo.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdzoo.corruptions import METADATA_FILE
from kdzoo.errors import DataError

__all__ = [
    "StreamBatches",
    "folder_listing",
    "folder_sources",
    "layout_files",
    "npy_header",
    "npy_sources",
    "read_npy_labels",
]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: ``(file, keys, labels)`` of a block: a ``.npy`` path and row indices, or ``None`` and paths.
Source = tuple[str | None, Any, np.ndarray]


def layout_files(corruptions: Sequence[str], severities: Sequence[int]) -> dict[str, list[str]]:
    """What a set in each layout (``"npy"``, ``"folders"``) holds for these blocks."""
    return {
        "npy": ["labels.npy", *(f"{c}.npy" for c in corruptions)],
        "folders": [f"{c}/{s}" for c in corruptions for s in severities],
    }


# -- the .npy layout ------------------------------------------------------------------------------


def npy_header(root: Path, corruption: str) -> tuple[tuple[int, int, int], int]:
    """``(H, W, C)`` of the images of ``<corruption>.npy`` and the class count of the labels."""
    images = np.load(root / f"{corruption}.npy", mmap_mode="r")
    shape = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    labels = np.load(root / "labels.npy", mmap_mode="r")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return (int(shape[0]), int(shape[1]), int(shape[2])), num_classes


def severity_slots(root: Path) -> list[int]:
    """Which severities a ``.npy`` set stacks, in order (1..5 unless its metadata says)."""
    meta = root / METADATA_FILE
    if meta.is_file():
        try:
            return [int(s) for s in json.loads(meta.read_text())["severities"]]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{meta}: unreadable 'severities' ({err})") from None
    return [1, 2, 3, 4, 5]


def read_npy_labels(root: Path) -> tuple[np.ndarray, list[int]]:
    """The labels of a ``.npy`` set, checked to split into its severity slots, and the slots."""
    labels = np.load(root / "labels.npy")
    slots = severity_slots(root)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{root / 'labels.npy'}: expected integer labels, got {labels.dtype}")
    if len(labels) == 0 or len(labels) % len(slots):
        raise DataError(
            f"{root / 'labels.npy'}: {len(labels)} labels do not split into {len(slots)} severities"
        )
    return labels, slots


def npy_sources(
    root: Path,
    labels: np.ndarray,
    slots: list[int],
    corruptions: Sequence[str],
    blocks: Sequence[Any],
    num_examples: int | None,
) -> list[Source]:
    """The source of each block (``corruption``, ``severity``): the first ``num_examples`` rows
    (all for ``None``) of the severity's slice of ``<corruption>.npy``, after checking the files."""
    per = len(labels) // len(slots)
    n = per if num_examples is None else min(per, num_examples)
    shapes = {}
    for c in corruptions:
        path = root / f"{c}.npy"
        try:
            images = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise DataError(f"{path}: not a readable .npy file ({err})") from None
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{path}: expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
        shapes[c] = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    if len(set(shapes.values())) > 1:
        raise DataError(f"{root}: the corruption files hold images of different shapes {shapes}")
    missing = sorted({b.severity for b in blocks} - set(slots))
    if missing:
        raise DataError(f"{root}: severities {missing} are not in the files (they hold {slots})")
    sources = []
    for block in blocks:
        start = slots.index(block.severity) * per
        keys = np.arange(start, start + n)
        sources.append((str(root / f"{block.corruption}.npy"), keys, labels[keys]))
    return sources


# -- the folder layout ----------------------------------------------------------------------------


def folder_listing(first: Path) -> tuple[list[str], list[Path]]:
    """Sorted wnids and sorted image paths of one ``<corruption>/<severity>`` folder."""
    wnids = sorted(e.name for e in os.scandir(first) if e.is_dir())
    paths = [
        first / w / f
        for w in wnids
        for f in sorted(os.listdir(first / w))
        if f.lower().endswith(IMAGE_SUFFIXES)
    ]
    if not paths:
        raise DataError(f"{first}: no images in <wnid>/ subfolders")
    return wnids, paths


def folder_sources(
    root: Path,
    first: Path,
    listing: tuple[list[str], list[Path]],
    blocks: Sequence[Any],
    num_examples: int | None,
) -> list[Source]:
    """The source of each block: the images of ``listing`` (:func:`folder_listing` of ``first``,
    a ``<corruption>/<severity>`` folder), or a fixed random ``num_examples`` of them (seed 0),
    in every block's folder."""
    wnids, paths = listing
    relative = [p.relative_to(first) for p in paths]
    index = {w: i for i, w in enumerate(wnids)}
    labels = np.array([index[r.parts[0]] for r in relative], dtype=np.int64)
    if num_examples is not None and num_examples < len(relative):
        rng = np.random.default_rng(0)
        keep = np.sort(rng.choice(len(relative), num_examples, replace=False))
        relative, labels = [relative[i] for i in keep], labels[keep]
    sources = []
    for block in blocks:
        folder = root / block.corruption / str(block.severity)
        sources.append((None, [folder / r for r in relative], labels))
    return sources


# -- the batches ----------------------------------------------------------------------------------


class StreamBatches(Dataset):
    """Item ``i`` is the ``i``-th batch of the stream, already collated.

    ``batches`` holds ``(domain, source, image_keys, labels)``; a source is a ``.npy`` path
    (keys are row indices, read through a per-process memory map) or ``None`` for image files
    (keys are paths).
    """

    def __init__(
        self,
        batches: list[tuple[int, str | None, Any, np.ndarray]],
        transform: A.BasicTransform | None,
        mean: Sequence[float],
        std: Sequence[float],
        grey_to_rgb: bool,
    ) -> None:
        self.batches = batches
        self.transform = transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.grey_to_rgb = grey_to_rgb
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self):  # memory maps are reopened in each worker, never pickled
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return len(self.batches)

    def _load(self, source: str | None, keys) -> np.ndarray:
        if source is None:
            images = [np.asarray(Image.open(p).convert("RGB")) for p in keys]
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise DataError(
                    f"images of different sizes {sorted(shapes)} in one batch (e.g. {keys[0]}); "
                    "set data.image_size to resize them"
                )
            return np.stack(images)
        if source not in self._maps:
            self._maps[source] = np.load(source, mmap_mode="r")
        images = np.asarray(self._maps[source][keys])
        return images[..., None] if images.ndim == 3 else images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        domain, source, keys, labels = self.batches[i]
        images = self._load(source, keys)
        if self.transform is not None:
            images = np.stack([self.transform(image=im)["image"] for im in images])
            images = images[..., None] if images.ndim == 3 else images
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if self.grey_to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x - self.mean) / self.std).contiguous()
        y = torch.as_tensor(labels, dtype=torch.int64)
        return x, y, torch.full((len(y),), domain, dtype=torch.int64)
