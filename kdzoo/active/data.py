"""An image-classification DataModule split into a labelled and an unlabelled part.

Active learning with knowledge distillation ("PCoreSet: Effective Active Learning through
Knowledge Distillation from Vision-Language Models", arXiv:2506.00910, code
github.com/erjui/PCoreSet) trains the student on the labelled images with their labels and on the
rest of the training split (the unlabelled pool) through the teacher only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from kdzoo.datamodules.base import (
    DataError,
    ImageClassificationDataModule,
    ReseedingDataLoader,
    TransformedDataset,
    loader_start,
    seed_worker,
)

__all__ = ["ActiveDataModule", "IndexedDataset", "initial_labelled"]

HIDDEN_LABEL = -1


class IndexedDataset(Dataset):
    """Items ``(image, dataset_index)`` of a :class:`TransformedDataset` (no labels)."""

    def __init__(self, dataset: TransformedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[i][0], int(self.dataset.indices[i])


class ActiveDataModule(L.LightningDataModule):
    """The training split of ``base`` as a labelled set ``L`` and an unlabelled pool ``U``.

    Training batches are ``{"labelled": (x, y), "unlabelled": (x_u, -1)}`` from a
    :class:`~lightning.pytorch.utilities.combined_loader.CombinedLoader` in ``max_size_cycle``
    mode; the unlabelled items carry the label ``-1``, so no method can read a label that has not
    been revealed. Both sides use ``base``'s training augmentation. The labelled set is *repeated
    to the pool's length* (the ImageNet script of the PCoreSet code; its "others" script draws
    ``200 |L|`` labelled items per round instead), reshuffled every epoch, so an epoch is one pass
    over the pool and every step sees full batches of both. With ``unlabelled=False`` (active
    learning without distillation) batches are plain ``(x, y)`` from the same repeated labelled
    set, so both variants take the same number of steps. With an empty pool the labelled set is
    served alone, once per epoch.

    Validation and test are ``base``'s. :meth:`pool_dataloader` and :meth:`labelled_dataloader`
    serve ``(x, dataset_index)`` with the evaluation transforms, for selection.

    Args:
        base: an :class:`~kdzoo.datamodules.base.ImageClassificationDataModule` (e.g.
            ``FashionMNIST``); its training split (after ``val_fraction`` and ``train_subset``) is
            split into ``L`` and ``U``.
        labelled: dataset indices of the labelled images (as in ``base.train.indices``: positions
            in the dataset's official training set).
        unlabelled: serve the unlabelled pool in training batches.
    """

    def __init__(
        self,
        base: ImageClassificationDataModule,
        labelled: Sequence[int],
        unlabelled: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.labelled = np.asarray(sorted(int(i) for i in labelled), dtype=np.int64)
        if len(np.unique(self.labelled)) != len(self.labelled):
            raise DataError("the labelled set lists an image more than once")
        self.use_unlabelled = unlabelled
        self.labelled_train: TransformedDataset | None = None
        self.unlabelled_train: TransformedDataset | None = None
        self.labelled_eval: TransformedDataset | None = None
        self.pool: TransformedDataset | None = None

    # The properties the CLI links to the model: the base's.
    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def in_chans(self) -> int:
        return self.base.in_chans

    @property
    def mean(self) -> tuple[float, ...]:
        return self.base.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.base.std

    @property
    def class_names(self) -> list[str] | None:
        return self.base.class_names

    @property
    def pool_indices(self) -> np.ndarray:
        """Dataset indices of the unlabelled pool, ascending (after :meth:`setup`)."""
        return self._require(self.pool).indices

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)
        train = self.base.train
        in_train = np.isin(self.labelled, train.indices)
        if not in_train.all():
            missing = self.labelled[~in_train][:5].tolist()
            raise DataError(
                f"labelled images {missing} are not in {self.base.name}'s training split (they "
                "are validation images or outside data.train_subset): a labelled set belongs to "
                "one data config"
            )
        pool = np.setdiff1d(train.indices, self.labelled)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        augment = self.base.hparams.augment
        # L cycled to the pool's length (L itself once when the pool is empty or smaller).
        repeated = np.resize(self.labelled, max(len(pool), len(self.labelled)))
        self.labelled_train = self._view(repeated, train=augment, rank=rank)
        self.unlabelled_train = self._view(pool, train=augment, rank=rank, hide_labels=True)
        self.labelled_eval = self._view(self.labelled, train=False, rank=rank)
        self.pool = self._view(pool, train=False, rank=rank)

    def train_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_indices, labels)`` of the whole training split (sets ``base`` up)."""
        self.base.setup("fit")
        return self.base.train.indices.copy(), self.base.train.targets.copy()

    def _view(
        self, indices: np.ndarray, *, train: bool, rank: int, hide_labels: bool = False
    ) -> TransformedDataset:
        """``base.train`` restricted to ``indices``, with its own transform (and RNG)."""
        view = copy.copy(self.base.train)
        view.indices = np.asarray(indices, dtype=np.int64)
        view.transform = self.base.build_transform(train=train)
        view.rank = rank
        if hide_labels:
            view._targets = np.full_like(view._targets, HIDDEN_LABEL)
        view.reseed(0)
        return view

    # -- loaders ----------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        labelled = self._require(self.labelled_train)
        unlabelled = self._require(self.unlabelled_train)
        if len(unlabelled) == 0 or not self.use_unlabelled:
            return self._loader(labelled, shuffle=True)
        iterables = {
            "labelled": self._loader(labelled, shuffle=True),
            "unlabelled": self._loader(unlabelled, shuffle=True),
        }
        return CombinedLoader(iterables, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self.base.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.base.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.base.predict_dataloader()

    def pool_dataloader(self) -> DataLoader:
        """``(x, dataset_index)`` over the unlabelled pool, evaluation transforms, in order."""
        return self._loader(IndexedDataset(self._require(self.pool)), shuffle=False)

    def labelled_dataloader(self) -> DataLoader:
        """``(x, dataset_index)`` over the labelled set, evaluation transforms, in order."""
        return self._loader(IndexedDataset(self._require(self.labelled_eval)), shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.base.hparams.num_workers
        return ReseedingDataLoader(
            dataset,
            batch_size=self.base.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            drop_last=False,
            **loader_start(self.trainer, train=shuffle),
        )

    def _require(self, dataset: Any) -> Any:
        if dataset is None:
            raise RuntimeError("call ActiveDataModule.setup() before asking for its data")
        return dataset


def initial_labelled(
    indices: np.ndarray, labels: np.ndarray, per_class: int, num_classes: int, seed: int
) -> np.ndarray:
    """``per_class`` random images of every class (seeded by ``seed`` alone, so every strategy
    starts from the same set): their dataset indices, ascending.

    Raises:
        DataError: a class has fewer than ``per_class`` training images.
    """
    rng = np.random.default_rng([seed, 0])
    chosen = []
    for c in range(num_classes):
        members = indices[labels == c]
        if len(members) < per_class:
            raise DataError(
                f"class {c} has {len(members)} training images, fewer than "
                f"active.initial_per_class={per_class}: lower it or use more training data"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
