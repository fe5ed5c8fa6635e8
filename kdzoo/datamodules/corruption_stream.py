"""``CorruptionStream``: a corruption benchmark as one ordered test stream for continual TTA.

Reads the layouts of RobustBench (Croce et al., "RobustBench: a standardized adversarial
robustness benchmark", NeurIPS 2021 Datasets and Benchmarks, arXiv:2010.09670) for the
corruption benchmarks of Hendrycks & Dietterich ("Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261):

- ``.npy`` sets (CIFAR-10-C, CIFAR-100-C, and those written by :mod:`kdzoo.corruptions` such as
  FashionMNIST-C): ``<root>/<dataset>/<corruption>.npy``, uint8 ``(5 * N, H, W, C)`` with
  severities 1..5 stacked in order, and ``labels.npy``; severity ``s`` is the slice
  ``[(s - 1) N, s N)``. A set written with fewer severities says which in
  ``kdzoo_corruptions.json``.
- ImageNet-C folders: ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``, class ``k``
  being the ``k``-th wnid in sorted order (the standard ImageNet index). RobustBench's fixed
  5,000-image list is not bundled: ``num_examples`` instead draws a fixed random subset (seed 0)
  of the image paths, the same images for every corruption and severity.

The stream and its blocks follow the benchmark code (``mariodoebler/test-time-adaptation``; kdzoo
spec ``tta.md`` section 6): continual, the 15 corruptions in benchmark order at one severity;
gradual, each corruption at severities 1, 2, .., ``severity``, .., 2, 1 (1..5..1 for the
default). Each block (one corruption at one severity) is one domain of the stream, with its own
batches: a batch never mixes two domains, and the last batch of a block may be short. Batches
are ``(images, labels, domain)``: float32 ``N x C x H x W`` normalised with ``mean``/``std``,
int64 labels, int64 domain index into :attr:`CorruptionStream.domains`. Under DDP, run with
``--trainer.use_distributed_sampler=false`` so every process gets the whole stream in order
(otherwise Lightning deals the batches out to the ranks; the TTA methods refuse that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kdzoo.corruptions import CORRUPTIONS, METADATA_FILE
from kdzoo.datamodules.base import DataError, DatasetNotFoundError, resolve_root
from kdzoo.datamodules.cifar import CIFAR10, CIFAR100
from kdzoo.datamodules.fashion_mnist import FashionMNIST

__all__ = ["CorruptionStream", "StreamBlock", "stream_blocks"]

_IMAGENET = {
    "num_classes": 1000,
    "in_chans": 3,
    "size": 224,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
# Known sets: the clean datamodule whose normalisation a source trained by ``kdzoo fit`` used.
_CLEAN = {"FashionMNIST-C": FashionMNIST, "CIFAR-10-C": CIFAR10, "CIFAR-100-C": CIFAR100}
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class StreamBlock:
    """One domain of the stream: a corruption at a severity.

    ``name`` is ``"<corruption>-<severity>"``, with ``"#k"`` appended for the ``k``-th
    occurrence (``k >= 2``) of the same pair in the stream: the way down of a gradual domain
    and every repeat of the stream.
    """

    name: str
    corruption: str
    severity: int
    occurrence: int


def stream_blocks(
    corruptions: list[str], setting: str, severity: int, repeats: int
) -> list[StreamBlock]:
    """The blocks of the stream in order (see the module docstring)."""
    if setting == "gradual":
        levels = [*range(1, severity + 1), *range(severity - 1, 0, -1)]
    else:
        levels = [severity]
    pairs = [(c, s) for _ in range(repeats) for c in corruptions for s in levels]
    seen: dict[tuple[str, int], int] = {}
    blocks = []
    for corruption, s in pairs:
        k = seen[(corruption, s)] = seen.get((corruption, s), 0) + 1
        name = f"{corruption}-{s}" + (f"#{k}" if k > 1 else "")
        blocks.append(StreamBlock(name, corruption, s, k))
    return blocks


class _StreamBatches(Dataset):
    """Item ``i`` is the ``i``-th batch of the stream, already collated.

    ``batches`` holds ``(domain, source, image_keys, labels)``; a source is a ``.npy`` path
    (keys are row indices, read through a per-process memory map) or ``None`` for image files
    (keys are paths).
    """

    def __init__(self, batches, transform, mean, std, grey_to_rgb: bool) -> None:
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


class CorruptionStream(L.LightningDataModule):
    """A corruption benchmark as one test stream of domains, for ``kdzoo test`` with a TTA model.

    Args:
        root: folder holding ``<dataset>/``; ``None`` searches ``$KDZOO_DATA`` and
            ``~/.cache/kdzoo/data``.
        dataset: ``"CIFAR-10-C"``, ``"CIFAR-100-C"``, ``"ImageNet-C"``, ``"FashionMNIST-C"``, or
            any other folder name in the ``.npy`` or ImageNet-C layout.
        corruptions: the domains in order; ``None`` gives the 15 in benchmark order.
        setting: ``"continual"`` (each corruption at ``severity``) or ``"gradual"`` (each at
            1, .., ``severity``, .., 1).
        severity: 1..5.
        repeats: the whole sequence of domains, this many times (e.g. 3 to look for collapse).
        num_examples: images per block: the first ``num_examples`` of each severity slice (as
            RobustBench's ``NUM_EX``), or a fixed random subset of ImageNet-C; ``None``: all.
        shuffle_seed: ``None`` keeps the file order (RobustBench, RMT-era and CoTTA code); an
            integer permutes each block with its own generator seeded by
            ``(shuffle_seed, block index)`` (the current benchmark's per-domain shuffle; the same
            permutations for every method, though not Python ``random``'s).
        batch_size: images per batch (benchmark: 200 for CIFAR, 64 for ImageNet-C).
        num_workers: DataLoader worker processes.
        mean: per-channel normalisation of the [0, 1] images. ``None``: the clean datamodule's
            for FashionMNIST-C / CIFAR-10-C / CIFAR-100-C (so that a source trained by
            ``kdzoo fit --data FashionMNIST`` matches), ImageNet's for ImageNet-C, and 0 (no
            normalisation, RobustBench's inputs) for other sets.
        std: as ``mean`` (1 for other sets).
        image_size: resize to this side (bilinear, as the clean datamodules); ``None`` keeps
            the native size.
        grey_to_rgb: replicate grey images to 3 channels (as the clean datamodules' option).
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: str = "CIFAR-10-C",
        corruptions: list[str] | None = None,
        setting: Literal["continual", "gradual"] = "continual",
        severity: int = 5,
        repeats: int = 1,
        num_examples: int | None = None,
        shuffle_seed: int | None = None,
        batch_size: int = 200,
        num_workers: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        image_size: int | None = None,
        grey_to_rgb: bool = False,
    ) -> None:
        super().__init__()
        corruptions = list(CORRUPTIONS if corruptions is None else corruptions)
        problems = []
        if not dataset or Path(dataset).name != dataset:
            problems.append(f"dataset must be a folder name, got {dataset!r}")
        if not corruptions or not all(isinstance(c, str) and c for c in corruptions):
            problems.append(f"corruptions must be non-empty names, got {corruptions!r}")
        if setting not in ("continual", "gradual"):
            problems.append(f"setting must be 'continual' or 'gradual', got {setting!r}")
        if severity not in (1, 2, 3, 4, 5):
            problems.append(f"severity must be 1..5, got {severity!r}")
        for arg, value in (("repeats", repeats), ("batch_size", batch_size)):
            if value < 1:
                problems.append(f"{arg} must be >= 1, got {value!r}")
        if num_examples is not None and num_examples < 1:
            problems.append(f"num_examples must be None or >= 1, got {num_examples!r}")
        if shuffle_seed is not None and shuffle_seed < 0:
            problems.append(f"shuffle_seed must be None or >= 0, got {shuffle_seed!r}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers!r}")
        if image_size is not None and image_size < 1:
            problems.append(f"image_size must be None or >= 1, got {image_size!r}")
        if std is not None and min(std, default=1.0) <= 0:
            problems.append(f"std values must be > 0, got {std!r}")
        if problems:
            raise DataError("; ".join(problems))
        # mean/std stay out of hparams: the model receives the resolved values through the CLI
        # link, and Lightning refuses to log hparams whose shared keys differ.
        self.save_hyperparameters(ignore=["mean", "std"])
        self._given = {"mean": mean, "std": std}
        self.root = root
        self.dataset = dataset
        self.corruptions = corruptions
        self.blocks = stream_blocks(corruptions, setting, severity, repeats)
        self._root: Path | None = None
        self._layout: str | None = None
        self._native: tuple[int, int, int] | None = None  # (H, W, C) read from the files
        self._num_classes: int | None = None
        self._batches: _StreamBatches | None = None

    # -- properties linked to the model by the CLI (valid before setup for the known sets) ----

    @property
    def domains(self) -> list[str]:
        """The name of every block, in stream order; a batch's domain indexes this list."""
        return [b.name for b in self.blocks]

    @property
    def num_classes(self) -> int:
        if self.dataset in _CLEAN:
            return len(_CLEAN[self.dataset].default_class_names)
        if self.dataset == "ImageNet-C":
            return _IMAGENET["num_classes"]
        if self._num_classes is None:
            self._read_header()
        return self._num_classes

    @property
    def native_chans(self) -> int:
        if self.dataset in _CLEAN:
            return _CLEAN[self.dataset].native_chans
        if self.dataset == "ImageNet-C":
            return 3
        return self._read_header()[2]

    @property
    def in_chans(self) -> int:
        return 3 if self.hparams.grey_to_rgb else self.native_chans

    @property
    def native_size(self) -> int:
        if self.dataset in _CLEAN:
            return _CLEAN[self.dataset].native_size
        if self.dataset == "ImageNet-C":
            return _IMAGENET["size"]
        return self._read_header()[0]

    @property
    def image_size(self) -> int:
        return self.hparams.image_size or self.native_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self._normalisation("mean")

    @property
    def std(self) -> tuple[float, ...]:
        return self._normalisation("std")

    @property
    def class_names(self) -> list[str] | None:
        cls = _CLEAN.get(self.dataset)
        return list(cls.default_class_names) if cls is not None else None

    def _normalisation(self, key: str) -> tuple[float, ...]:
        given = self._given[key]
        if given is not None:
            values = tuple(float(v) for v in given)
        elif self.dataset in _CLEAN:
            values = tuple(getattr(_CLEAN[self.dataset], f"native_{key}"))
        elif self.dataset == "ImageNet-C":
            values = _IMAGENET[key]
        else:
            values = (0.0 if key == "mean" else 1.0,) * self.native_chans
        if len(values) == 1 and self.in_chans == 3 and self.native_chans == 1:
            values = values * 3  # grey statistics replicated with the channels
        if len(values) != self.in_chans:
            raise DataError(f"data.{key} must have in_chans={self.in_chans} values, got {values}")
        return values

    # -- locating and checking the files ---------------------------------------------------------

    def _how_to_get(self) -> list[str]:
        where = self.root or "DIR"
        hints = [f"pass --data.root DIR where DIR/{self.dataset} holds these files"]
        generate = "python tools/make_corruptions.py {} --out " + str(where)
        if self.dataset == "FashionMNIST-C":
            hints.insert(0, "generate it: " + generate.format("FashionMNIST"))
        elif self.dataset in ("CIFAR-10-C", "CIFAR-100-C"):
            record = "2535967" if self.dataset == "CIFAR-10-C" else "3555552"
            source = "CIFAR10" if self.dataset == "CIFAR-10-C" else "CIFAR100"
            hints.insert(
                0,
                f"download {self.dataset} (Zenodo record {record}) and unpack it into "
                f"{where}/{self.dataset}, or generate a stand-in: " + generate.format(source),
            )
        elif self.dataset == "ImageNet-C":
            hints.insert(
                0,
                f"download ImageNet-C (Zenodo record 2235448) and unpack it into "
                f"{where}/ImageNet-C/<corruption>/<severity>/<wnid>/",
            )
        else:
            hints.insert(
                0,
                "write it from a clean set: python tools/make_corruptions.py --npy IMAGES.npy "
                f"LABELS.npy --name {self.dataset} --out {where}",
            )
        return hints

    def _needed_severities(self) -> list[int]:
        return sorted({b.severity for b in self.blocks})

    def find_root(self) -> Path:
        """The ``<dataset>`` folder; :class:`DatasetNotFoundError` names what is missing."""
        if self._root is not None:
            return self._root
        npy = ["labels.npy", *(f"{c}.npy" for c in self.corruptions)]
        folders = [f"{c}/{s}" for c in self.corruptions for s in self._needed_severities()]
        layouts = {"npy": npy, "folders": folders}
        first = "folders" if self.dataset.startswith("ImageNet") else "npy"
        order = [first, "npy" if first == "folders" else "folders"]
        errors = {}
        for layout in order:
            try:
                self._root = resolve_root(
                    self.dataset,
                    self.root,
                    "",
                    layouts[layout],
                    layouts=(self.dataset,),
                    how_to_get=self._how_to_get(),
                )
            except DatasetNotFoundError as err:
                errors[layout] = err
                continue
            self._layout = layout
            return self._root
        # Name what is missing where the folder exists, so a partial set is easy to complete.
        message = str(errors[first])
        base = Path(self.root).expanduser() / self.dataset if self.root is not None else None
        if base is not None and base.is_dir():
            folders_there = any((base / c).is_dir() for c in self.corruptions)
            layout = "folders" if folders_there else "npy"
            missing = [str(base / item) for item in layouts[layout] if not (base / item).exists()]
            message = str(errors[layout]) + "\nMissing: " + ", ".join(missing)
        raise DatasetNotFoundError(message)

    def _severity_slots(self, root: Path) -> list[int]:
        """Which severities a ``.npy`` set stacks, in order (1..5 unless its metadata says)."""
        meta = root / METADATA_FILE
        if meta.is_file():
            try:
                return [int(s) for s in json.loads(meta.read_text())["severities"]]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{meta}: unreadable 'severities' ({err})") from None
        return [1, 2, 3, 4, 5]

    def _read_header(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the first corruption's images; sets the class count on the way."""
        if self._native is not None:
            return self._native
        root = self.find_root()
        if self._layout == "npy":
            images = np.load(root / f"{self.corruptions[0]}.npy", mmap_mode="r")
            shape = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
            labels = np.load(root / "labels.npy", mmap_mode="r")
            self._num_classes = int(labels.max()) + 1 if len(labels) else 0
        else:
            wnids, paths = self._folder_listing(root)
            image = np.asarray(Image.open(paths[0]).convert("RGB"))
            shape = image.shape
            self._num_classes = len(wnids)
        self._native = (int(shape[0]), int(shape[1]), int(shape[2]))
        return self._native

    def _folder_listing(self, root: Path) -> tuple[list[str], list[Path]]:
        """Sorted wnids and the sorted image paths of the first needed corruption/severity."""
        first = root / self.corruptions[0] / str(self._needed_severities()[0])
        wnids = sorted(e.name for e in os.scandir(first) if e.is_dir())
        paths = [
            first / w / f
            for w in wnids
            for f in sorted(os.listdir(first / w))
            if f.lower().endswith(_IMAGE_SUFFIXES)
        ]
        if not paths:
            raise DataError(f"{first}: no images in <wnid>/ subfolders")
        return wnids, paths

    # -- the stream ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._batches is not None:
            return
        root = self.find_root()
        if self._layout == "npy":
            sources = self._npy_blocks(root)
        else:
            sources = self._folder_blocks(root)
        h, w, c = self._read_header()
        expected_chans = self.native_chans
        if self.dataset in _CLEAN or self.dataset == "ImageNet-C":
            if c != expected_chans:
                raise DataError(
                    f"{root}: {self.dataset} should hold {expected_chans}-channel images, the "
                    f"files hold {c} (shape H x W x C = {h} x {w} x {c})"
                )
            if self.hparams.image_size is None and (h, w) != (self.native_size,) * 2:
                raise DataError(
                    f"{root}: {self.dataset} images should be {self.native_size}x"
                    f"{self.native_size}, the files hold {h}x{w}; set data.image_size to resize"
                )
        if self.num_classes < 1:
            raise DataError(f"{root}: no labels")

        batches = []
        size = self.hparams.batch_size
        for domain, (source, keys, labels) in enumerate(sources):
            keys, labels = self._order(domain, keys, labels)
            for start in range(0, len(labels), size):
                batch_keys = keys[start : start + size]
                batches.append((domain, source, batch_keys, labels[start : start + size]))
        transform = None
        if self.image_size != w or self.image_size != h:
            transform = A.Resize(self.image_size, self.image_size)
        self._batches = _StreamBatches(
            batches, transform, self.mean, self.std, self.hparams.grey_to_rgb
        )

    def _order(self, domain: int, keys, labels: np.ndarray):
        """The block's order: file order, or a permutation seeded by (shuffle_seed, block)."""
        seed = self.hparams.shuffle_seed
        if seed is None:
            return keys, labels
        perm = np.random.default_rng([seed, domain]).permutation(len(labels))
        keys = keys[perm] if isinstance(keys, np.ndarray) else [keys[i] for i in perm]
        return keys, labels[perm]

    def _npy_blocks(self, root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
        labels = np.load(root / "labels.npy")
        slots = self._severity_slots(root)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{root / 'labels.npy'}: expected integer labels, got {labels.dtype}")
        if len(labels) == 0 or len(labels) % len(slots):
            raise DataError(
                f"{root / 'labels.npy'}: {len(labels)} labels do not split into "
                f"{len(slots)} severities"
            )
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(
                f"{root / 'labels.npy'}: labels {int(labels.min())}..{int(labels.max())} "
                f"out of range 0..{self.num_classes - 1} for {self.dataset}"
            )
        per = len(labels) // len(slots)
        n = per if self.hparams.num_examples is None else min(per, self.hparams.num_examples)
        shapes = {}
        for c in self.corruptions:
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
            raise DataError(
                f"{root}: the corruption files hold images of different shapes {shapes}"
            )
        missing = [s for s in self._needed_severities() if s not in slots]
        if missing:
            raise DataError(
                f"{root}: severities {missing} are not in the files (they hold {slots})"
            )
        sources = []
        for block in self.blocks:
            start = slots.index(block.severity) * per
            keys = np.arange(start, start + n)
            sources.append((str(root / f"{block.corruption}.npy"), keys, labels[keys]))
        return sources

    def _folder_blocks(self, root: Path) -> list[tuple[None, list[Path], np.ndarray]]:
        wnids, paths = self._folder_listing(root)
        if self.dataset == "ImageNet-C" and len(wnids) != _IMAGENET["num_classes"]:
            raise DataError(
                f"{root}: ImageNet-C should have 1000 wnid folders per corruption/severity, "
                f"found {len(wnids)}"
            )
        first = root / self.corruptions[0] / str(self._needed_severities()[0])
        relative = [p.relative_to(first) for p in paths]
        index = {w: i for i, w in enumerate(wnids)}
        labels = np.array([index[r.parts[0]] for r in relative], dtype=np.int64)
        num = self.hparams.num_examples
        if num is not None and num < len(relative):
            keep = np.sort(np.random.default_rng(0).choice(len(relative), num, replace=False))
            relative, labels = [relative[i] for i in keep], labels[keep]
        sources = []
        for block in self.blocks:
            folder = root / block.corruption / str(block.severity)
            sources.append((None, [folder / r for r in relative], labels))
        return sources

    # -- loaders ---------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        if self._batches is None:
            raise RuntimeError("call CorruptionStream.setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        # batch_size=None: each item is a whole batch of one block, in stream order.
        return DataLoader(
            self._batches,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def train_dataloader(self) -> DataLoader:
        raise DataError(
            "CorruptionStream is a test stream: adapt with `kdzoo test --model <TTA method>`, "
            "train the source with `kdzoo fit` on the clean datamodule"
        )

    val_dataloader = train_dataloader
