"""Unsupervised domain adaptation data: a labelled source dataset and an unlabelled target one.

The GTA5 -> Cityscapes protocol of DAFormer and FST (Du et al., "Learning from Future: A Novel
Self-Training Framework for Semantic Segmentation", NeurIPS 2022, arXiv:2209.06993; code
github.com/usr922/FST): every step takes a batch of labelled source crops and a batch of target
crops whose masks are never read; validation and test run on the target's labelled splits.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from kdzoo.datamodules.segmentation.base import SegmentationDataModule, SegmentationDataset
from kdzoo.datamodules.skeleton import check_count, seeded_subset
from kdzoo.errors import DataError

__all__ = ["DomainAdaptation"]


class DomainAdaptation(L.LightningDataModule):
    """Labelled ``source`` + unlabelled ``target`` training; ``target`` validation and test.

    Train batches are ``{"labelled": (image, mask), "unlabelled": image_u}`` (plus ``"future"``
    with ``future_batches``), as :class:`SegmentationDataModule` serves for semi-supervised data.
    Each side keeps its own pipeline (crop, random scale, batch size), so e.g. GTA5 frames can be
    scaled by 2/3 and Cityscapes by 1/2 before the 512 crops, as DAFormer resizes them.

    Args:
        source: the labelled dataset (e.g. ``GTA5``); its val/test splits are not used.
        target: the adapted-to dataset (e.g. ``Cityscapes``); its training images are the
            unlabelled set (``target.train_subset`` applies), its val/test splits evaluate.
        future_batches: extra independently shuffled source/target batch pairs per step (FST-W).
    """

    def __init__(
        self,
        source: SegmentationDataModule,
        target: SegmentationDataModule,
        future_batches: int = 0,
    ) -> None:
        super().__init__()
        check_count("future_batches", future_batches, 0)
        if source.num_classes != target.num_classes:
            raise DataError(
                f"source {source.name} has {source.num_classes} classes and target {target.name} "
                f"{target.num_classes}: domain adaptation needs one label space (GTA5 and "
                "Cityscapes share the 19 Cityscapes classes)"
            )
        if tuple(source.mean) != tuple(target.mean) or tuple(source.std) != tuple(target.std):
            raise DataError(
                f"source and target normalise differently (mean {source.mean} vs {target.mean}, "
                f"std {source.std} vs {target.std}): one model sees both, so use the same"
            )
        if target.labelled_list is not None or target.use_unlabelled:
            raise DataError(
                "the target of domain adaptation is unlabelled as a whole: leave the target's "
                "labelled_list and unlabelled unset"
            )
        self.source, self.target = source, target
        self.future_batches = future_batches
        self.train_unlabelled: SegmentationDataset | None = None

    # The properties the CLI links to the model: the target's.
    @property
    def num_classes(self) -> int:
        return self.target.num_classes

    @property
    def in_chans(self) -> int:
        return self.target.in_chans

    @property
    def mean(self) -> tuple[float, ...]:
        return self.target.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.target.std

    @property
    def class_names(self) -> list[str]:
        return self.target.class_names

    @property
    def ignore_index(self) -> int:
        return self.target.ignore_index

    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for datamodule in (self.source, self.target):
            datamodule.trainer = self.trainer
            datamodule.setup(stage)
        if self.train_unlabelled is None:
            target = self.target
            data = target.load_split("train")
            indices = seeded_subset(np.arange(len(data)), target.train_subset, target.split_seed, 1)
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.train_unlabelled = target.make_dataset(
                data, indices, target.train_transform(), False, rank
            )

    def train_dataloader(self) -> CombinedLoader:
        if self.train_unlabelled is None or self.source.train is None:
            raise RuntimeError("call DomainAdaptation.setup() before asking for a dataloader")

        def pair(fresh: bool) -> dict[str, DataLoader]:
            return {
                "labelled": self.source._train_loader(self.source.train, fresh),
                "unlabelled": self.target._train_loader(self.train_unlabelled, fresh),
            }

        iterables: dict[str, Any] = pair(fresh=False)
        if self.future_batches:
            iterables["future"] = [pair(fresh=True) for _ in range(self.future_batches)]
        return CombinedLoader(iterables, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self.target.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.target.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.target.predict_dataloader()
