"""Write a corrupted copy of a clean test set in the RobustBench layout.

    python -m kdzoo.corruptions FashionMNIST --out DIR     # -> DIR/FashionMNIST-C/
    python -m kdzoo.corruptions CIFAR10 --out DIR          # -> DIR/CIFAR-10-C/ (a stand-in)
    python -m kdzoo.corruptions --npy images.npy labels.npy --name MySet-C --out DIR

A dataset name is a kdzoo datamodule whose test split holds uint8 images (``FashionMNIST``,
``CIFAR10``, ``CIFAR100``), found where ``--data`` would find it (``--root`` to point at it).
``--npy`` takes any clean set: uint8 ``(N, H, W, C)`` images and ``N`` integer labels.
``tools/make_corruptions.py`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from kdzoo.corruptions import CORRUPTIONS, SEVERITIES, CorruptionError, write_corruption_set
from kdzoo.errors import KDZooError

#: kdzoo datamodule -> the folder name its corrupted test set gets (RobustBench's for CIFAR).
SET_NAMES = {"FashionMNIST": "FashionMNIST-C", "CIFAR10": "CIFAR-10-C", "CIFAR100": "CIFAR-100-C"}


def load_test_split(dataset: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw uint8 ``(N, H, W, C)`` test images and labels of a kdzoo datamodule."""
    import kdzoo.datamodules as datamodules

    if dataset not in SET_NAMES:
        raise CorruptionError(
            f"unknown dataset {dataset!r}: choose from {', '.join(SET_NAMES)}, or pass --npy "
            "IMAGES LABELS for any other clean set"
        )
    datamodule = getattr(datamodules, dataset)(root=root)
    _, (images, labels) = datamodule.load_data()
    return np.asarray(images), np.asarray(labels)


def load_npy(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.load(images_path), np.load(labels_path)
    if images.ndim == 3:  # (N, H, W) grey images
        images = images[..., None]
    return images, labels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kdzoo.corruptions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", nargs="?", help=f"one of {', '.join(SET_NAMES)}")
    p.add_argument("--npy", nargs=2, metavar=("IMAGES", "LABELS"), help="a clean set as .npy")
    p.add_argument("--out", required=True, help="parent folder of the set")
    p.add_argument("--name", help="the set's folder name (default: e.g. FashionMNIST-C)")
    p.add_argument("--root", help="where the clean dataset is (default: kdzoo's search)")
    p.add_argument("--num", type=int, help="only the first NUM test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), metavar="NAME")
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--frost-dir", help="folder with the reference frost photographs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    try:
        if (args.dataset is None) == (args.npy is None):
            raise CorruptionError("give either a dataset name or --npy IMAGES LABELS")
        if args.npy is not None:
            images, labels = load_npy(*args.npy)
            name = args.name or f"{Path(args.npy[0]).stem}-C"
        else:
            images, labels = load_test_split(args.dataset, args.root)
            name = args.name or SET_NAMES[args.dataset]
        if args.num is not None:
            if args.num < 1:
                raise CorruptionError(f"--num must be >= 1, got {args.num}")
            images, labels = images[: args.num], labels[: args.num]
        print(
            f"{name}: {len(images)} images {images.shape[1:]}, {len(args.corruptions)} "
            f"corruptions x severities {args.severities}, {args.workers} process(es)"
        )
        header = " ".join(f"{'s' + str(s):>6}" for s in args.severities)
        print(f"{'corruption':<18} {header}   (mean |corrupted - clean| pixel distance, 0..255)")
        start = time.perf_counter()
        target = write_corruption_set(
            images,
            labels,
            args.out,
            name,
            severities=args.severities,
            corruptions=args.corruptions,
            seed=args.seed,
            overwrite=args.overwrite,
            workers=args.workers,
            frost_dir=args.frost_dir,
            progress=lambda line: print(line, flush=True),
        )
    except KDZooError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {target} in {time.perf_counter() - start:.1f} s")
    return target


if __name__ == "__main__":
    main()
