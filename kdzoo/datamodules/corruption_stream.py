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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from kdzoo.corruptions import CORRUPTIONS
from kdzoo.datamodules.cifar import CIFAR10, CIFAR100
from kdzoo.datamodules.corruption_files import (
    StreamBatches,
    folder_listing,
    folder_sources,
    layout_files,
    npy_header,
    npy_sources,
    read_npy_labels,
)
from kdzoo.datamodules.fashion_mnist import FashionMNIST
from kdzoo.datamodules.skeleton import (
    DatasetNotFoundError,
    KDZooDataModule,
    check_arg,
    check_choice,
    resolve_root,
)
from kdzoo.errors import DataError

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
Setting = Literal["continual", "gradual"]


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


class CorruptionStream(KDZooDataModule):
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
        mean: per-channel normalisation of the [0, 1] images. ``None``: the clean datamodule's
            for FashionMNIST-C / CIFAR-10-C / CIFAR-100-C (so that a source trained by
            ``kdzoo fit --data FashionMNIST`` matches), ImageNet's for ImageNet-C, and 0 (no
            normalisation, RobustBench's inputs) for other sets.
        std: as ``mean`` (1 for other sets).
        image_size: resize to this side (bilinear, as the clean datamodules); ``None`` keeps
            the native size.
        grey_to_rgb: replicate grey images to 3 channels (as the clean datamodules' option).
        Other arguments (``num_workers``): see
            :class:`~kdzoo.datamodules.skeleton.KDZooDataModule`.
    """

    # mean/std stay out of hparams: the model receives the resolved values through the CLI link,
    # and Lightning refuses to log hparams whose shared keys differ.
    unsaved_arguments = ("mean", "std")

    def __init__(
        self,
        root: str | None = None,
        *,
        dataset: str = "CIFAR-10-C",
        corruptions: list[str] | None = None,
        setting: Setting = "continual",
        severity: int = 5,
        repeats: int = 1,
        num_examples: int | None = None,
        shuffle_seed: int | None = None,
        batch_size: int = 200,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        image_size: int | None = None,
        grey_to_rgb: bool = False,
        **kwargs: Any,
    ) -> None:
        # Before super().__init__, which saves the arguments: hparams hold the actual list.
        corruptions = list(CORRUPTIONS if corruptions is None else corruptions)
        ok = bool(dataset) and Path(dataset).name == dataset
        check_arg("dataset", dataset, ok, "a folder name")
        ok = bool(corruptions) and all(isinstance(c, str) and c for c in corruptions)
        check_arg("corruptions", corruptions, ok, "non-empty names")
        # From Python, a misspelt setting would silently give the continual stream.
        check_choice("setting", setting, Setting)
        check_arg("severity", severity, severity in (1, 2, 3, 4, 5), "1..5")
        check_arg("repeats", repeats, repeats >= 1, ">= 1")
        optional = [("num_examples", num_examples, 1), ("shuffle_seed", shuffle_seed, 0)]
        for arg, value, low in [*optional, ("image_size", image_size, 1)]:
            check_arg(arg, value, value is None or value >= low, f"None or >= {low}")
        if std is not None and min(std, default=1.0) <= 0:
            raise DataError(f"std values must be > 0, got {std!r}")
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self._given = {"mean": mean, "std": std}
        self.dataset = dataset
        self.corruptions = corruptions
        self.blocks = stream_blocks(corruptions, setting, severity, repeats)
        self._root: Path | None = None
        self._layout: str | None = None
        self._native: tuple[int, int, int] | None = None  # (H, W, C) read from the files
        self._num_classes: int | None = None

    @property
    def name(self) -> str:
        """The set's folder name, which names it in messages."""
        return self.dataset

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

    # -- locating and reading the files ----------------------------------------------------------

    def how_to_get(self) -> list[str]:
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
        layouts = layout_files(self.corruptions, self._needed_severities())
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
                    how_to_get=self.how_to_get(),
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

    def _first_folder(self, root: Path) -> Path:
        """The folder of the first corruption at the first needed severity (folder layout)."""
        return root / self.corruptions[0] / str(self._needed_severities()[0])

    def _read_header(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the first corruption's images; sets the class count on the way."""
        if self._native is not None:
            return self._native
        root = self.find_root()
        if self._layout == "npy":
            self._native, self._num_classes = npy_header(root, self.corruptions[0])
        else:
            wnids, paths = folder_listing(self._first_folder(root))
            shape = np.asarray(Image.open(paths[0]).convert("RGB")).shape
            self._native = (int(shape[0]), int(shape[1]), int(shape[2]))
            self._num_classes = len(wnids)
        return self._native

    # -- the stream ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.test is not None:
            return
        root = self.find_root()
        if self._layout == "npy":
            sources = self._npy_sources(root)
        else:
            sources = self._folder_sources(root)
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
        size = self.batch_size
        for domain, (source, keys, labels) in enumerate(sources):
            keys, labels = self._order(domain, keys, labels)
            for start in range(0, len(labels), size):
                batch_keys = keys[start : start + size]
                batches.append((domain, source, batch_keys, labels[start : start + size]))
        transform = None
        if self.image_size != w or self.image_size != h:
            transform = A.Resize(self.image_size, self.image_size)
        self.test = self.predict = StreamBatches(
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

    def _npy_sources(self, root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
        labels, slots = read_npy_labels(root)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(
                f"{root / 'labels.npy'}: labels {int(labels.min())}..{int(labels.max())} "
                f"out of range 0..{self.num_classes - 1} for {self.dataset}"
            )
        num_examples = self.hparams.num_examples
        return npy_sources(root, labels, slots, self.corruptions, self.blocks, num_examples)

    def _folder_sources(self, root: Path) -> list[tuple[None, list[Path], np.ndarray]]:
        first = self._first_folder(root)
        listing = folder_listing(first)
        wnids = listing[0]
        if self.dataset == "ImageNet-C" and len(wnids) != _IMAGENET["num_classes"]:
            raise DataError(
                f"{root}: ImageNet-C should have 1000 wnid folders per corruption/severity, "
                f"found {len(wnids)}"
            )
        return folder_sources(root, first, listing, self.blocks, self.hparams.num_examples)

    # -- loaders ---------------------------------------------------------------------------------

    def loader(self, dataset: Any, train: bool = False, **kwargs: Any) -> DataLoader:
        # Each item is a whole batch of one block, in stream order (batch_size=None). A plain
        # DataLoader, not the skeleton's ReseedingDataLoader: the stream is neither shuffled nor
        # augmented, and a ReseedingDataLoader would draw otherwise from the global RNG, which
        # the TTA methods draw from too.
        return DataLoader(
            self.require_setup(dataset),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        raise DataError(
            "CorruptionStream is a test stream: adapt with `kdzoo test --model <TTA method>`, "
            "train the source with `kdzoo fit` on the clean datamodule"
        )

    val_dataloader = train_dataloader
