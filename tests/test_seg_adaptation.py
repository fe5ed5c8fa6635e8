"""DomainAdaptation: labelled source + unlabelled target batches, target evaluation, and the
clear errors for mismatched datasets."""

from __future__ import annotations

import pytest
import torch
from test_seg_datamodules import (
    write_cityscapes,
    write_gta,
    write_voc,
)

from kdzoo.datamodules import GTA5, Cityscapes, DataError, DomainAdaptation, PascalVOC


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _pair(tmp_path, **kwargs):
    write_gta(tmp_path / "gta", n=6)
    write_cityscapes(tmp_path / "cs", n_train=4, n_val=2)
    common = {"crop_size": 16, "batch_size": 2}
    source = GTA5(root=str(tmp_path / "gta"), scale_range=(0.5, 0.5), **common)
    target = Cityscapes(root=str(tmp_path / "cs"), scale_range=(1.0, 1.0), **common)
    return DomainAdaptation(source, target, **kwargs)


def test_batches_pair_labelled_source_with_unlabelled_target(tmp_path):
    dm = _pair(tmp_path, future_batches=2)
    assert dm.num_classes == 19 and dm.in_chans == 3
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    images, masks = batch["labelled"]
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16)
    assert masks.dtype == torch.int64
    assert torch.is_tensor(batch["unlabelled"]) and batch["unlabelled"].shape == (2, 3, 16, 16)
    assert len(batch["future"]) == 2
    # An epoch is as long as the longer side: 4 target images / 2 vs 5 GTA5 train frames / 2.
    assert len(list(dm.train_dataloader())) == max(len(dm.source.train), 4) // 2
    # Evaluation is on the target's (labelled) val split, at full size.
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape[-2:] == (32, 48) and masks.max() <= 255


def test_the_target_images_are_the_unlabelled_set(tmp_path):
    dm = _pair(tmp_path)
    dm.setup("fit")
    assert len(dm.train_unlabelled) == 4 and not dm.train_unlabelled.with_masks


def test_mismatched_label_spaces_are_refused(tmp_path):
    write_voc(tmp_path / "voc")
    write_cityscapes(tmp_path / "cs")
    voc = PascalVOC(root=str(tmp_path / "voc"))
    with pytest.raises(DataError, match="21 classes and target Cityscapes 19"):
        DomainAdaptation(voc, Cityscapes(root=str(tmp_path / "cs")))
