"""``data.classes``: keeping a subset of the classes, relabelled in the order given.

The Knowledge Concentration specialists train on one vertical each this way. Checked on
scikit-learn digits (no files, no network) against the images and labels of the same datamodule
without a selection, and on tiny Fashion-MNIST files whose labels go up to 9. Also: every
datamodule class offers the arguments of its bases, which it forwards through ``**kwargs``.
"""

from __future__ import annotations

import gzip
import inspect
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import kdzoo.datamodules
from kdzoo.datamodules import DataError, Digits, FashionMNIST, KDZooDataModule
from kdzoo.errors import KDZooError


def test_selection_relabels_in_the_given_order() -> None:
    full = Digits(batch_size=16)
    full.setup("fit")
    classes = [7, 2, 5]
    dm = Digits(batch_size=16, classes=classes)
    assert dm.num_classes == 3 and dm.class_names == ["7", "2", "5"]
    dm.setup("fit")
    for split in ("train", "val", "test"):
        subset, whole = getattr(dm, split), getattr(full, split)
        keep = np.isin(whole.targets, classes)
        # Exactly the images of the selected classes, in the same order, relabelled 0..k-1.
        np.testing.assert_array_equal(subset.indices, whole.indices[keep])
        np.testing.assert_array_equal(
            subset.targets, [classes.index(label) for label in whole.targets[keep]]
        )
        assert set(subset.targets.tolist()) == {0, 1, 2}
    assert dm.predict is dm.test
    x, y = next(iter(dm.test_dataloader()))
    x_full, _ = full.test[int(np.flatnonzero(np.isin(full.test.targets, classes))[0])]
    torch.testing.assert_close(x[0], x_full)
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 2


def test_split_is_drawn_before_the_selection() -> None:
    """A specialist never trains on images that a run on all classes holds out for validation."""
    full = Digits()
    full.setup("fit")
    for classes in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]):
        dm = Digits(classes=classes)
        dm.setup("fit")
        assert set(dm.val.indices) <= set(full.val.indices)
        assert set(dm.train.indices) <= set(full.train.indices)


def test_subsets_are_drawn_after_the_selection() -> None:
    dm = Digits(classes=[3, 8], train_subset=50, eval_subset=20)
    dm.setup("fit")
    assert (len(dm.train), len(dm.val), len(dm.test)) == (50, 20, 20)
    assert set(dm.train.targets.tolist()) == {0, 1}


def test_all_classes_in_order_changes_nothing() -> None:
    full, same = Digits(), Digits(classes=list(range(10)))
    full.setup("fit")
    same.setup("fit")
    assert same.num_classes == 10 and same.class_names == full.class_names
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(same, split).indices, getattr(full, split).indices)
        np.testing.assert_array_equal(getattr(same, split).targets, getattr(full, split).targets)


@pytest.mark.parametrize(
    ("classes", "fragments"),
    [
        ([1, 4, 1, 4, 2], ["duplicated [1, 4]"]),
        ([0, 10, -1], ["out of range [-1, 10]", "0..9"]),
        ([], ["no class given"]),
        ([3, 3, 12], ["duplicated [3]", "out of range [12]"]),
    ],
)
def test_bad_selection_is_a_clear_error(classes, fragments) -> None:
    with pytest.raises(DataError) as info:
        Digits(classes=classes)
    message = str(info.value)
    assert isinstance(info.value, KDZooError)  # printed by `kdzoo` as one line
    for fragment in fragments:
        assert fragment in message, message


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_files_keep_their_full_label_range(tmp_path: Path) -> None:
    """The files' labels go up to 9 however few classes are kept (no 'out of range' error)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(40) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(20) % 10,
    }
    for name, array in arrays.items():
        (tmp_path / f"{name}.gz").write_bytes(_idx(array))
    dm = FashionMNIST(root=str(tmp_path), classes=[5, 7, 9], val_fraction=0.25)
    assert dm.num_classes == 3 and dm.class_names == ["Sandal", "Sneaker", "Ankle boot"]
    dm.setup("fit")
    assert dm.test.targets.tolist() == [0, 1, 2, 0, 1, 2]
    assert len(dm.train) + len(dm.val) == 12


# Base arguments a class passes itself, so that they are not among its options.
NOT_OFFERED = {"ImageFolder": {"classes"}, "FashionMNISTMosaics": {"labelled_list"}}
DATAMODULES = [
    cls
    for cls in map(kdzoo.datamodules.__dict__.get, kdzoo.datamodules.__all__)
    if isinstance(cls, type) and issubclass(cls, KDZooDataModule) and not inspect.isabstract(cls)
]


@pytest.mark.parametrize("cls", DATAMODULES, ids=lambda cls: cls.__name__)
def test_options_include_every_argument_forwarded_to_the_bases(cls) -> None:
    """``--data.help`` and configs see the arguments a class forwards through ``**kwargs``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    offered = set(parser.get_defaults().data.keys())
    arguments = set()
    for base in cls.__mro__:
        if issubclass(base, KDZooDataModule) and "__init__" in vars(base):
            parameters = inspect.signature(base.__init__).parameters.values()
            arguments |= {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}
            arguments |= {p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD}
    assert {"root", "batch_size", "num_workers"} <= offered
    assert offered == arguments - {"self"} - NOT_OFFERED.get(cls.__name__, set())
