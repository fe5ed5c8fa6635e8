"""Tests for the generated Fashion-MNIST mosaics (kdzoo's offline segmentation benchmark).

Most tests use tiny fake Fashion-MNIST IDX files whose items make the expected canvases easy to
state independently (constant-intensity items: every item pixel is visible and its grey level
names its class); one test uses the real files when the Debian package is installed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.datamodules import DataError, DatasetNotFoundError, FashionMNISTMosaics
from kdzoo.datamodules.segmentation import mosaics

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip
# Grey level of the constant items of class k (all above the visibility threshold 25).
LEVEL = 60 + 19 * np.arange(10)
SMALL = {"num_train": 40, "num_val": 12, "num_test": 16}


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array, written from the format description."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(directory: Path, kind: str = "constant", n_train=600, n_test=200) -> str:
    """Items of class ``i % 10``: constant squares at ``LEVEL[k]``, or uniform noise."""
    rng = np.random.default_rng(0)
    arrays = []
    for n in (n_train, n_test):
        labels = np.arange(n) % 10
        if kind == "constant":
            images = np.broadcast_to(LEVEL[labels][:, None, None], (n, 28, 28))
        else:
            images = rng.integers(0, 256, (n, 28, 28))
        arrays += [images.astype(np.uint8), labels.astype(np.uint8)]
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in zip(NAMES, arrays, strict=True):
        (directory / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return str(directory)


@pytest.fixture
def constant_root(tmp_path) -> str:
    return write_fmnist(tmp_path / "constant")


def generated(**kwargs) -> dict:
    return FashionMNISTMosaics(**kwargs).generate()


# -- generation ----------------------------------------------------------------------------------


def test_same_arguments_give_identical_arrays_and_seeds_differ(constant_root):
    first = generated(root=constant_root, **SMALL)
    second = generated(root=constant_root, **SMALL)
    other = generated(root=constant_root, mosaic_seed=1, **SMALL)
    assert set(first) == {"train", "val", "test", "target"}
    for split in first:
        np.testing.assert_array_equal(first[split].images, second[split].images)
        np.testing.assert_array_equal(first[split].masks, second[split].masks)
        assert not np.array_equal(first[split].masks, other[split].masks)
    shapes = {split: first[split].images.shape for split in first}
    assert shapes == {"train": (40, 64, 64, 3), "val": (12, 64, 64, 3),
                      "test": (16, 64, 64, 3), "target": (40, 64, 64, 3)}  # fmt: skip
    assert all(first[s].images.dtype == first[s].masks.dtype == np.uint8 for s in first)


def test_source_pixels_are_the_top_item_and_masks_its_class(constant_root):
    data = generated(root=constant_root, **SMALL)
    for split in ("train", "val", "test"):
        images, masks = data[split].images, data[split].masks
        assert (images == images[..., :1]).all()  # grey written to 3 channels
        grey = images[..., 0].astype(int)
        item = masks > 0
        # Constant items: the pixel's grey level names the class the mask holds there.
        np.testing.assert_array_equal(grey[item], LEVEL[masks[item] - 1])
        assert (grey[~item] == 0).all()  # a black background
        classes_per_canvas = [len(np.unique(m[m > 0])) for m in masks]
        assert min(classes_per_canvas) >= 1 and max(classes_per_canvas) <= 4


def test_visible_pixels_are_those_above_the_threshold(tmp_path):
    data = generated(root=write_fmnist(tmp_path / "noise", kind="noise"), **SMALL)
    for split in ("train", "val", "test"):
        grey, masks = data[split].images[..., 0], data[split].masks
        np.testing.assert_array_equal(grey > 25, masks > 0)
        assert (masks > 0).mean() < 0.5


def test_item_sizes_follow_the_rescale_range(constant_root):
    # One item per canvas: the mask is one filled square whose side is round(28 * s).
    data = generated(root=constant_root, items=(1, 1), **SMALL)
    sides = [int((m > 0).any(axis=0).sum()) for m in data["train"].masks]
    assert all((m > 0).sum() == side**2 for m, side in zip(data["train"].masks, sides, strict=True))
    assert min(sides) >= 21 and max(sides) <= 35 and max(sides) - min(sides) >= 6


def test_target_domain_shares_layouts_but_not_pixels(constant_root):
    source = generated(root=constant_root, **SMALL)
    target = generated(root=constant_root, eval_domain="target", **SMALL)
    for split in ("val", "test"):
        np.testing.assert_array_equal(source[split].masks, target[split].masks)
        assert not np.array_equal(source[split].images, target[split].images)
    np.testing.assert_array_equal(source["train"].images, target["train"].images)
    masks = target["test"].masks
    src = source["test"].images.astype(float)
    tgt = target["test"].images.astype(float)
    item = masks > 0
    # Reduced contrast: the items at 0.6 of their grey level (plus zero-mean noise).
    ratio = tgt[item].mean() / src[item].mean()
    assert 0.55 < ratio < 0.65
    # A textured, tinted background instead of black, dark but partly above the threshold.
    background = tgt[~item]
    assert 5 < background.mean() < 40 and background.std() > 5 and (background > 25).mean() > 0.1
    assert np.abs(tgt[..., 0] - tgt[..., 2])[~item].mean() > 1  # a colour cast
    # The adaptation set is in the target domain too, from other items than the source canvases.
    assert target["target"].images[target["target"].masks == 0].mean() > 5
    dm = FashionMNISTMosaics(root=constant_root)
    pools = dm._pools(600)
    assert sum(len(p) for p in pools.values()) == 600
    assert len(np.unique(np.concatenate(list(pools.values())))) == 600  # disjoint


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_class_statistics():
    dm = FashionMNISTMosaics()
    data = dm.generate()
    counts = np.bincount(data["train"].masks.ravel(), minlength=11)
    share = counts / counts.sum()
    assert share[0] > 0.5 and share[0] == share.max()  # background dominates
    assert share[1:].min() > 0.005  # ... and every class appears
    images = data["train"].images / 255.0
    np.testing.assert_allclose(images.mean(), dm.mean[0], atol=0.01)
    np.testing.assert_allclose(images.std(), dm.std[0], atol=0.01)


# -- splits and batches ----------------------------------------------------------------------------


def test_labelled_and_unlabelled_splits(constant_root):
    rest = FashionMNISTMosaics(root=constant_root, labelled=10, unlabelled="rest", **SMALL)
    rest.setup("fit")
    assert len(rest.train) == 10 and len(rest.train_unlabelled) == 30
    assert set(rest.train.indices).isdisjoint(rest.train_unlabelled.indices)
    assert set(rest.train.indices) | set(rest.train_unlabelled.indices) == set(range(40))
    assert not rest.train_unlabelled.with_masks

    target = FashionMNISTMosaics(root=constant_root, unlabelled="target", **SMALL)
    target.setup("fit")
    assert len(target.train) == 40 and len(target.train_unlabelled) == 40
    assert target.train_unlabelled.data is target.generate()["target"]

    none = FashionMNISTMosaics(root=constant_root, labelled=10, **SMALL)
    none.setup("fit")
    assert len(none.train) == 10 and none.train_unlabelled is None
    assert (len(none.val), len(none.test)) == (12, 16)


def test_batches(constant_root):
    dm = FashionMNISTMosaics(root=constant_root, labelled=16, unlabelled="target",
                             batch_size=8, future_batches=1, **SMALL)  # fmt: skip
    dm.setup("fit")
    L.seed_everything(0)
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == 5  # 40 target canvases // 8; the 16 labelled ones are cycled
    x, y = batches[0]["labelled"]
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (8, 64, 64) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= {*range(11), 255}
    assert batches[0]["unlabelled"].shape == (8, 3, 64, 64)
    assert len(batches[0]["future"]) == 1
    x, y = next(iter(dm.val_dataloader()))  # eval_batch_size 64 > 12 canvases
    assert x.shape == (12, 3, 64, 64) and y.shape == (12, 64, 64)
    np.testing.assert_array_equal(y.numpy(), dm.generate()["val"].masks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canvas_size": 20}, "canvas_size must be an integer >= 28"),
        ({"num_train": 0}, "num_train must be an integer >= 1"),
        ({"labelled": 41}, r"labelled must be None or in 1\.\.40"),
        ({"labelled": 40, "unlabelled": "rest"}, r"labelled must be None or in 1\.\.39"),
        ({"unlabelled": "rest"}, "labelled must be set with unlabelled='rest'"),
        ({"unlabelled": "all"}, "unlabelled must be 'none', 'rest' or 'target'"),
        ({"eval_domain": "other"}, "eval_domain must be 'source' or 'target'"),
        ({"items": (3, 2)}, "items must be"),
        ({"future_batches": 1}, "future_batches must be 0 with unlabelled='none'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        FashionMNISTMosaics(**{**SMALL, **kwargs})


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    dm = FashionMNISTMosaics(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "python -m kdzoo.datamodules FashionMNIST --download" in message
    assert "--data.download" not in message  # the mosaics have no such argument


def test_preview_writes_both_domains(constant_root, tmp_path):
    grid = FashionMNISTMosaics(root=constant_root).preview(3)
    assert grid.shape == (3 * 68, 3 * 68, 3) and grid.dtype == np.uint8
    out = tmp_path / "preview.png"
    mosaics.main(["--out", str(out), "--n", "2", "--root", constant_root])
    with Image.open(out) as image:
        assert image.size == (2 * 68, 3 * 68)


def test_later_items_cover_earlier_ones():
    # Two constant items of side >= 21 in a 28-pixel canvas always share rows/cols 7..20.
    items = np.stack([np.full((28, 28), 100, np.uint8), np.full((28, 28), 200, np.uint8)])
    labels = np.array([3, 8])
    for seed in range(5):
        for order in ([0, 1], [1, 0]):
            intensity, mask = mosaics.make_layouts(
                items, labels, np.array(order), 1, np.random.default_rng(seed), 28, (2, 2)
            )
            last = order[-1]
            assert mask[0, 10, 10] == labels[last] + 1 and intensity[0, 10, 10] == items[last, 0, 0]
