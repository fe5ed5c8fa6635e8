"""Pairs of pre-extracted embedding vectors (CrisisMMD-style image/text features).

MST-Distill (Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", ACM MM 2025, arXiv:2507.07015) trains on CrisisMMD-V2 (Alam, Ofli, Imran,
"CrisisMMD: Multimodal Twitter Datasets from Natural Disasters", ICWSM 2018, arXiv:1805.00713) as
frozen features: a 2048-d ResNet-50 pooled image feature and a 768-d BERTweet pooler output per
tweet, fed to MLPs as they are (its ``utils.get_cmmd_v2`` leaves the min-max normalisation
commented out; https://github.com/Gray-OREO/MST-Distill). This DataModule reads any such pair of
feature matrices from ``.npy`` files, in one of two layouts under ``root``:

- ``{train,val,test}_m1.npy`` ``(N, D1)``, ``{train,val,test}_m2.npy`` ``(N, D2)``,
  ``{train,val,test}_labels.npy`` ``(N,)``: the splits as given;
- ``m1.npy``, ``m2.npy``, ``labels.npy``: all samples, split 60/20/20 at random as the repo does
  (``split_seed``, or the repo's ``metadata/<db>_indices.csv`` via ``split_file``).

An optional ``class_names.txt`` (one name per line) names the classes and fixes their number;
otherwise ``num_classes`` gives it, or the largest label + 1. Features are returned as stored
(float32), without normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdzoo.datamodules.paired.base import (
    PairedDataset,
    PairedInfo,
    PairedModalityDataModule,
    as_tensor,
    check_labels,
    check_lengths,
    load_npy,
    random_split,
)
from kdzoo.datamodules.skeleton import check_arg, check_count
from kdzoo.errors import ConfigError, DataError

__all__ = ["FeaturePairs"]

SPLITS = ("train", "val", "test")


def _prepare(x1: np.ndarray, x2: np.ndarray, label: np.int64):
    return as_tensor(x1), as_tensor(x2), int(label)


class FeaturePairs(PairedModalityDataModule):
    """Two modalities of feature vectors with class labels (layouts in the module docstring).

    ``modality_shapes`` and ``num_classes`` come from the files: reading them the first time
    opens the ``.npy`` headers (memory-mapped) and the labels, so a missing dataset is reported
    there.

    Found under ``$KDZOO_DATA/feature_pairs`` or ``~/.cache/kdzoo/data/feature_pairs`` without
    ``root``; MST-Distill trains on CrisisMMD with ``batch_size=512``.

    Args:
        modalities: names of m1 and m2 (MST-Distill's CrisisMMD: image, text).
        split_file: single-file layout only: a permutation CSV in the repo's
            ``metadata/<db>_indices.csv`` format; column ``group_<split_seed>`` is used.
        num_classes: number of classes when there is no ``class_names.txt`` (``None``: the
            largest label + 1).
        Other arguments: see :class:`~kdzoo.datamodules.paired.base.PairedModalityDataModule`.
    """

    name = "FeaturePairs"
    data_subdir = "feature_pairs"
    install_hint = (
        "write the features as .npy files, e.g. with the extraction scripts in "
        "https://github.com/Gray-OREO/MST-Distill/tree/main/data_preprocess"
    )

    def __init__(
        self,
        *,
        modalities: tuple[str, str] = ("image", "text"),
        split_file: str | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        names = tuple(modalities)
        ok = len(names) == 2 and all(isinstance(m, str) and m for m in names)
        check_arg("modalities", modalities, ok and names[0] != names[1], "two distinct names")
        check_count("num_classes", num_classes, optional=True)
        self.names: tuple[str, str] = (names[0], names[1])
        self.split_file, self.fixed_num_classes = split_file, num_classes

    @property
    def modalities(self) -> tuple[str, str]:
        return self.names  # known without reading the files, unlike the shapes

    # -- layout -----------------------------------------------------------------------------------

    def _files(self, prefix: str) -> dict[str, str]:
        m1, m2 = self.names
        where = f", {prefix[:-1]} split" if prefix else ""
        return {
            f"{prefix}m1.npy": f"modality '{m1}'{where}",
            f"{prefix}m2.npy": f"modality '{m2}'{where}",
            f"{prefix}labels.npy": f"labels{where}",
        }

    def _split_layout(self) -> bool:
        """Whether the data comes split: the first searched directory holding any file of
        either layout decides (the split layout when none does, for the error message)."""
        split_files = [f"{s}_{x}.npy" for s in SPLITS for x in ("m1", "m2", "labels")]
        for directory in self.search_dirs():
            if any((directory / name).exists() for name in split_files):
                return True
            if any((directory / name).exists() for name in ("m1.npy", "m2.npy", "labels.npy")):
                return False
        return True

    def how_to_get(self) -> list[str]:
        return [
            *super().how_to_get(),
            "give all samples as m1.npy, m2.npy and labels.npy instead (split 60/20/20 by kdzoo)",
        ]

    @property
    def expected_files(self) -> dict[str, str]:
        if self._split_layout():
            return {k: v for split in SPLITS for k, v in self._files(f"{split}_").items()}
        return self._files("")

    def read(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``{split: (m1, m2, labels)}`` (``"all"`` for the single-file layout), checked."""
        root = self.find_root()
        prefixes = [f"{s}_" for s in SPLITS] if self._split_layout() else [""]
        parts, dims = {}, None
        for prefix in prefixes:
            files = self._files(prefix)
            m1, m2, labels = (load_npy(root / name, what) for name, what in files.items())
            where = f"{self.name} {prefix[:-1] or 'data'} in {root}"
            for name, x in ((f"{prefix}m1.npy", m1), (f"{prefix}m2.npy", m2)):
                if x.ndim != 2:
                    raise DataError(f"{where}: {name} has shape {x.shape}, expected (N, D)")
            if dims is not None and (m1.shape[1], m2.shape[1]) != dims:
                raise DataError(
                    f"{where}: feature sizes {(m1.shape[1], m2.shape[1])} differ "
                    f"from the train split's {dims}"
                )
            dims = (m1.shape[1], m2.shape[1])
            check_lengths(where, {self.names[0]: m1, self.names[1]: m2, "labels": labels})
            parts[prefix[:-1] or "all"] = (m1, m2, check_labels(labels, None, where))
        return parts

    def describe(self) -> PairedInfo:
        parts = self.read()
        m1, m2, _ = next(iter(parts.values()))
        top = max((int(y.max()) for _, _, y in parts.values() if len(y)), default=0)
        names = self._class_names(self.find_root(), top + 1)
        if top >= len(names):
            raise DataError(f"{self.name}: label {top} is out of range for {len(names)} classes")
        return PairedInfo(self.names, ((m1.shape[1],), (m2.shape[1],)), names)

    def _class_names(self, root: Path, inferred: int) -> tuple[str, ...]:
        path = root / "class_names.txt"
        if path.exists():
            names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
            n = self.fixed_num_classes
            if n is not None and n != len(names):
                raise ConfigError(f"num_classes={n} but {path} names {len(names)} classes")
            return names
        return tuple(str(c) for c in range(self.fixed_num_classes or inferred))

    def load_splits(self) -> tuple[PairedDataset, PairedDataset, PairedDataset]:
        _ = self.info  # checks the labels against the class names
        parts = self.read()
        if "all" not in parts:
            if self.split_file is not None:
                raise ConfigError(
                    f"split_file={self.split_file!r} applies to the single-file layout "
                    "(m1.npy, m2.npy, labels.npy); this dataset comes split into train/val/test"
                )
            train, val, test = (PairedDataset(*parts[s], _prepare) for s in SPLITS)
            return train, val, test
        pairs = PairedDataset(*parts["all"], _prepare)
        train, val, test = random_split(len(pairs), self.split_seed, self.split_file)
        return pairs.subset(train), pairs.subset(val), pairs.subset(test)
