"""AV-MNIST: MNIST digit images paired with spoken-digit spectrograms (10 classes).

AV-MNIST (Vielzeuf et al., "CentralNet: a Multilayer Approach for Multimodal Fusion", ECCV
Workshops 2018, arXiv:1808.07275; distributed in MultiBench's layout, Liang et al., NeurIPS 2021
Datasets and Benchmarks, arXiv:2107.07502) is the first benchmark of MST-Distill (Li et al.,
"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM 2025,
arXiv:2507.07015). Layout, as read by the official code (``utils.get_av_mnist`` of
https://github.com/Gray-OREO/MST-Distill)::

    <root>/image/{train,test}_data.npy   (N, 784) or (N, 28, 28) greyscale digits
    <root>/audio/{train,test}_data.npy   (N, 112, 112) spectrograms
    <root>/{train,test}_labels.npy       (N,) digit ids 0..9

m1 = image ``(1, 28, 28)``, m2 = audio ``(1, 112, 112)``, each min-max normalised to [0, 1] *per
sample*: the repo's ``min_max_normalize`` reduces over every axis but the first for 2-D and 3-D
arrays, which these are, so normalising item by item (memory-mapped, never the whole 5 GB of
spectrograms at once) gives the repo's values.

Splits: by default (``split="official"``) the official 60,000/10,000 train/test split, with
``val_fraction`` of the official train part held out for validation (seeded by ``split_seed``).
MST-Distill itself pools train and test and cuts a random 60/20/20 split; ``split="random"``
does that (``split_file`` then takes the repo's permutation CSV, if one is at hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdzoo.datamodules.paired.base import (
    PairedDataset,
    PairedInfo,
    PairedModalityDataModule,
    as_tensor,
    check_labels,
    check_lengths,
    load_npy,
    min_max,
    random_split,
)
from kdzoo.datamodules.skeleton import check_arg, check_choice, check_fraction, holdout_split
from kdzoo.errors import DataError

__all__ = ["AVMNIST"]

Split = Literal["official", "random"]
IMAGE_SHAPE = (1, 28, 28)
AUDIO_SHAPE = (1, 112, 112)


class _Concat:
    """Integer indexing over two arrays end to end, without copying them (for the pooled split)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, j: int) -> Any:
        n = len(self.first)
        return self.first[j] if j < n else self.second[j - n]


def _prepare(image: Any, audio: Any, label: Any):
    return (
        as_tensor(min_max(image).reshape(IMAGE_SHAPE)),
        as_tensor(min_max(audio).reshape(AUDIO_SHAPE)),
        int(label),
    )


class AVMNIST(PairedModalityDataModule):
    """AV-MNIST image/audio pairs (see the module docstring for layout and normalisation).

    Found under ``$KDZOO_DATA/avmnist`` or ``~/.cache/kdzoo/data/avmnist`` without ``root``;
    MST-Distill trains with ``batch_size=512``.

    Args:
        split: ``"official"`` (train/test files; val held out of train, seeded by ``split_seed``)
            or ``"random"`` (the repo's pooled 60/20/20 split, permuted by ``split_seed``).
        val_fraction: share of the official train part held out for validation, in (0, 1)
            (``split="official"`` only).
        split_file: with ``split="random"``, a permutation CSV in the repo's
            ``metadata/<db>_indices.csv`` format; column ``group_<split_seed>`` is used.
        Other arguments: see :class:`~kdzoo.datamodules.paired.base.PairedModalityDataModule`.
    """

    name = "AV-MNIST"
    data_subdir = "avmnist"
    install_hint = (
        "get AV-MNIST as .npy files in MultiBench's layout "
        "(https://github.com/pliang279/MultiBench) or the preprocessed copy linked from "
        "https://github.com/Gray-OREO/MST-Distill's README"
    )

    def __init__(
        self,
        *,
        split: Split = "official",
        val_fraction: float = 0.1,
        split_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # From Python, a misspelt split would silently be the official one.
        check_choice("split", split, Split)
        check_fraction("val_fraction", val_fraction)
        check_arg(
            "split_file",
            split_file,
            split_file is None or split == "random",
            "None unless split='random' (the official split is fixed)",
        )
        self.split, self.val_fraction, self.split_file = split, val_fraction, split_file

    def describe(self) -> PairedInfo:
        return PairedInfo(("image", "audio"), (IMAGE_SHAPE, AUDIO_SHAPE), tuple("0123456789"))

    @property
    def expected_files(self) -> dict[str, str]:
        files = {}
        for part in ("train", "test"):
            files[f"image/{part}_data.npy"] = f"modality 'image', {part} part"
            files[f"audio/{part}_data.npy"] = f"modality 'audio', {part} part"
            files[f"{part}_labels.npy"] = f"labels, {part} part"
        return files

    def load_part(self, root: Path, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked ``(images, audio, labels)`` of the official ``part`` ("train" or "test")."""
        image = load_npy(root / "image" / f"{part}_data.npy", f"modality 'image', {part} part")
        audio = load_npy(root / "audio" / f"{part}_data.npy", f"modality 'audio', {part} part")
        labels = load_npy(root / f"{part}_labels.npy", f"labels, {part} part")
        where = f"{self.name} {part} part in {root}"
        if image.shape[1:] not in ((784,), (28, 28)):
            raise DataError(
                f"{where}: image/{part}_data.npy has shape {image.shape}, "
                "expected (N, 784) or (N, 28, 28)"
            )
        if audio.shape[1:] != (112, 112):
            raise DataError(
                f"{where}: audio/{part}_data.npy has shape {audio.shape}, expected (N, 112, 112)"
            )
        check_lengths(where, {"image": image, "audio": audio, "labels": labels})
        return image, audio, check_labels(labels, 10, f"{where}: {part}_labels.npy")

    def load_splits(self) -> tuple[PairedDataset, PairedDataset, PairedDataset]:
        root = self.find_root()
        train_image, train_audio, train_labels = self.load_part(root, "train")
        test_image, test_audio, test_labels = self.load_part(root, "test")
        if self.split == "random":
            # The repo concatenates train then test before permuting; so do the indices here.
            image, audio = _Concat(train_image, test_image), _Concat(train_audio, test_audio)
            pooled = PairedDataset(
                image, audio, np.concatenate([train_labels, test_labels]), _prepare
            )
            train, val, test = random_split(len(pooled), self.split_seed, self.split_file)
            return pooled.subset(train), pooled.subset(val), pooled.subset(test)
        train = PairedDataset(train_image, train_audio, train_labels, _prepare)
        train_idx, val_idx = holdout_split(len(train), self.val_fraction, self.split_seed)
        test = PairedDataset(test_image, test_audio, test_labels, _prepare)
        return train.subset(train_idx), train.subset(val_idx), test
