"""Tests for kdzoo.datamodules: offline, on tiny data written into tmp_path, and sklearn digits."""

import gc
import gzip
import os
import pickle
import pickletools
import re
import struct
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from trainer_helpers import quiet_trainer

from kdzoo.datamodules import (
    CIFAR10,
    CIFAR100,
    DataError,
    DatasetNotFoundError,
    Digits,
    FashionMNIST,
    ImageFolder,
)
from kdzoo.datamodules.cifar import UnsafePickleError, load_cifar_pickle
from kdzoo.datamodules.digits import load_digits_uint8
from kdzoo.datamodules.fashion_mnist import IDXFormatError, read_idx
from kdzoo.errors import KDZooError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    # Neither the user's $KDZOO_DATA nor their ~/.cache/kdzoo may leak into a test.
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# -- tiny data writers -----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array, written from the format description."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_fmnist_arrays(n_train=40, n_test=20, same_image=False, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    if same_image:
        train[:] = train[0]
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    labels = (np.arange(n_train) % 10, np.arange(n_test) % 10)
    return train, labels[0].astype(np.uint8), test, labels[1].astype(np.uint8)


def write_fmnist(directory: Path, arrays=None, gz=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in zip(FMNIST_NAMES, arrays or make_fmnist_arrays(), strict=True):
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def fmnist_root(tmp_path):
    return write_fmnist(tmp_path / "fmnist")


CIFAR_SPECS = {
    CIFAR10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch"),
    CIFAR100: ("cifar-100-python", ["train"], "test"),
}


def cifar_batch(rows: np.ndarray, labels: list[int], cls) -> dict:
    batch = {"batch_label": "tiny", "data": rows, "filenames": [f"{i}.png" for i in labels]}
    if cls is CIFAR10:
        batch["labels"] = labels
    else:
        batch["fine_labels"] = labels
        batch["coarse_labels"] = [label // 5 for label in labels]
    return batch


def write_cifar(root: Path, cls, nested=True, n_train=40, n_test=20, seed=0) -> Path:
    """Tiny CIFAR pickles (protocol 2, like the originals) with 'meta' names in upper case."""
    folder, train_files, test_file = CIFAR_SPECS[cls]
    directory = root / folder if nested else root
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = cls().num_classes
    rows = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    labels = [i % k for i in range(n_train)]
    for i, name in enumerate(train_files):
        part = slice(i * n_train // len(train_files), (i + 1) * n_train // len(train_files))
        batch = cifar_batch(rows[part], labels[part], cls)
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    test_rows = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test = cifar_batch(test_rows, [i % k for i in range(n_test)], cls)
    (directory / test_file).write_bytes(pickle.dumps(test, protocol=2))
    names = [n.upper() for n in cls().class_names]
    if cls is CIFAR10:
        meta_name, meta = "batches.meta", {"label_names": names, "num_vis": 3072}
    else:
        meta_name, meta = "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20}
    (directory / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return directory


def write_image_folder(root: Path, classes=("cat", "ant", "bee"), n_train=5, n_val=2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (20, 26) if i % 2 else (30, 18)  # both orientations
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
            (root / split / c / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    return root


def unnormalise(x: torch.Tensor, dm) -> np.ndarray:
    """Back to 0..255 N x H x W x C, to compare batches with the raw pixels."""
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()


# -- properties and arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (FashionMNIST, {}, (10, 1, 28, (0.2860,))),
        (FashionMNIST, {"grey_to_rgb": True, "image_size": 32}, (10, 3, 32, (0.2860,) * 3)),
        (Digits, {}, (10, 1, 32, (0.3053,))),
        (Digits, {"image_size": 16, "grey_to_rgb": True}, (10, 3, 16, (0.3053,) * 3)),
        (CIFAR10, {}, (10, 3, 32, (0.4914, 0.4822, 0.4465))),
        (CIFAR10, {"grey_to_rgb": True}, (10, 3, 32, (0.4914, 0.4822, 0.4465))),  # no-op on RGB
        (CIFAR100, {"image_size": 64}, (100, 3, 64, (0.5071, 0.4865, 0.4409))),
    ],
)
def test_properties_before_setup(cls, kwargs, expected):
    # No data exists at this root: the CLI links these properties before setup() runs.
    dm = cls(root="/nonexistent/kdzoo", **kwargs)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.mean) == expected
    assert len(dm.std) == dm.in_chans and min(dm.std) > 0
    assert len(dm.class_names) == dm.num_classes == len(set(dm.class_names))
    assert dm.train is None


def test_standard_class_names():
    assert FashionMNIST().class_names[0] == "T-shirt/top"
    assert FashionMNIST().class_names[-1] == "Ankle boot"
    assert CIFAR10().class_names[:2] == ["airplane", "automobile"]
    # The CIFAR-100 fine labels are in alphabetical order in the meta file.
    names = CIFAR100().class_names
    assert names == sorted(names) and names[0] == "apple" and names[-1] == "worm"
    assert Digits().class_names == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"image_size": 0}, "image_size must be None or >= 1"),
        ({"split_seed": -1}, "split_seed must be an integer >= 0"),
        ({"train_subset": 0}, "train_subset must be None or an integer >= 1"),
        ({"eval_subset": 0}, "eval_subset must be None or an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, message):
    # DataError is a ValueError and a KDZooError, which the kdzoo command prints as one line.
    with pytest.raises(DataError, match=message):
        FashionMNIST(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_chans": 2}, "in_chans must be 1 or 3"),
        ({"mean": (0.5,)}, "mean must have in_chans=3 values"),
        ({"in_chans": 1, "std": (0.2, 0.2, 0.2)}, "std must have in_chans=1 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std values must be > 0"),
        ({"image_size": 0}, "image_size must be None or >= 1"),
    ],
)
def test_image_folder_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        ImageFolder(root="/nonexistent", **kwargs)


def test_hyperparameters_include_subclass_arguments():
    assert Digits().hparams["image_size"] == 32
    hp = ImageFolder(root="/x", in_chans=1, image_size=64).hparams
    assert (hp["in_chans"], hp["image_size"], hp["root"]) == (1, 64, "/x")


def test_dataloader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        Digits().train_dataloader()


# -- Fashion-MNIST ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "gz"), [("", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_batches(tmp_path, layout, gz):
    arrays = make_fmnist_arrays()
    write_fmnist(tmp_path / layout, arrays, gz=gz)
    dm = FashionMNIST(root=str(tmp_path), batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.find_root() == tmp_path / layout
    assert (len(dm.train), len(dm.val), len(dm.test)) == (36, 4, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    # Eval batches are exactly the normalised raw test images, in order.
    x, y = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(unnormalise(x, dm)[..., 0], arrays[2][:8], atol=1e-3)
    assert y.tolist() == arrays[3][:8].tolist()
    assert len(dm.predict_dataloader().dataset) == 20


def test_fashion_mnist_grey_to_rgb_and_resize(fmnist_root):
    grey = FashionMNIST(root=str(fmnist_root), batch_size=4)
    rgb = FashionMNIST(root=str(fmnist_root), batch_size=4, grey_to_rgb=True)
    big = FashionMNIST(root=str(fmnist_root), batch_size=4, image_size=36)
    for dm in (grey, rgb, big):
        dm.setup("test")
    (g, _), (c, _), (b, _) = (next(iter(dm.test_dataloader())) for dm in (grey, rgb, big))
    assert c.shape == (4, 3, 28, 28) and rgb.in_chans == 3
    for channel in range(3):  # same image and same normalisation in every channel
        torch.testing.assert_close(c[:, channel], g[:, 0])
    assert b.shape == (4, 1, 36, 36) and big.image_size == 36
    x, _ = next(iter(big.train_dataloader()))
    assert x.shape == (4, 1, 36, 36)


def test_augment_false_trains_on_eval_transforms(fmnist_root):
    arrays = make_fmnist_arrays()
    dm = FashionMNIST(root=str(fmnist_root), augment=False)
    dm.setup("fit")
    images = np.stack([dm.train[i][0].numpy() for i in range(len(dm.train))])
    raw = arrays[0][dm.train.indices]
    np.testing.assert_allclose(unnormalise(torch.from_numpy(images), dm)[..., 0], raw, atol=1e-3)


def test_split_is_seeded_disjoint_and_complete(fmnist_root):
    def splits(seed):
        dm = FashionMNIST(root=str(fmnist_root), split_seed=seed, val_fraction=0.25)
        dm.setup("fit")
        return dm.train.indices, dm.val.indices

    train, val = splits(0)
    assert len(val) == 10 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(40))
    again = splits(0)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(splits(1)[1], val)


def test_split_ignores_the_global_rng(fmnist_root):
    def val_indices():
        dm = FashionMNIST(root=str(fmnist_root))
        dm.setup("fit")
        return dm.val.indices

    torch.manual_seed(1)
    np.random.seed(1)
    first = val_indices()
    torch.manual_seed(2)
    np.random.seed(2)
    np.testing.assert_array_equal(val_indices(), first)


def test_subsets(fmnist_root):
    def build(**kwargs):
        dm = FashionMNIST(root=str(fmnist_root), val_fraction=0.25, **kwargs)
        dm.setup("fit")
        return dm

    full = build()
    sub = build(train_subset=7, eval_subset=3)
    assert (len(sub.train), len(sub.val), len(sub.test)) == (7, 3, 3)
    assert set(sub.train.indices) <= set(full.train.indices)
    assert set(sub.val.indices) <= set(full.val.indices)
    assert sub.predict is sub.test
    np.testing.assert_array_equal(
        build(train_subset=7, eval_subset=3).train.indices, sub.train.indices
    )
    # The train subset is not simply the first items of the split.
    assert not np.array_equal(sub.train.indices, full.train.indices[:7])
    # A subset larger than the split keeps the whole split.
    assert len(build(eval_subset=1000).test) == 20


# -- determinism of augmentation -------------------------------------------------------------------


def _epochs(root: Path, seed: int, num_workers: int, n_epochs=2):
    L.seed_everything(seed, verbose=False)
    dm = FashionMNIST(root=str(root), batch_size=8, num_workers=num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n_epochs)]
    # After a second epoch, torch's persistent-worker iterator sits in a reference cycle; free it
    # (and stop its workers) now, before the next loader forks, or its shutdown can stall for
    # seconds later on.
    del loader
    if num_workers:
        gc.collect()
    return epochs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentation_is_deterministic_and_changes_every_epoch(tmp_path, num_workers):
    # Every training image is the same, so batches differ only through augmentation.
    root = write_fmnist(tmp_path / "same", make_fmnist_arrays(n_train=24, same_image=True))
    run_a = _epochs(root, 7, num_workers)
    run_b = _epochs(root, 7, num_workers)
    assert len(run_a[0]) == 3  # 22 training items in batches of 8
    for epoch_a, epoch_b in zip(run_a, run_b, strict=True):
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch_1 = torch.cat([x for x, _ in run_a[0]])
    epoch_2 = torch.cat([x for x, _ in run_a[1]])
    assert not torch.equal(epoch_1, epoch_2)
    # Samples within an epoch get different augmentations, and with workers, the batches of
    # worker 0 and worker 1 (batches 0 and 1) do not repeat each other's random stream.
    assert len(torch.unique(epoch_1, dim=0)) > len(epoch_1) // 2
    assert not torch.equal(run_a[0][0][0], run_a[0][1][0])
    other_seed = torch.cat([x for x, _ in _epochs(root, 8, num_workers, n_epochs=1)[0]])
    assert not torch.equal(other_seed, epoch_1)


def test_indexing_an_augmented_dataset_directly_is_reproducible(fmnist_root):
    def first_items():
        dm = FashionMNIST(root=str(fmnist_root))
        dm.setup("fit")
        return torch.stack([dm.train[i][0] for i in range(8)])

    torch.testing.assert_close(first_items(), first_items(), rtol=0, atol=0)


# -- data location and errors ----------------------------------------------------------------------


def test_missing_data_error_names_paths_and_how_to_get_it(tmp_path, monkeypatch):
    system_dir = tmp_path / "usr-share-datasets"
    monkeypatch.setattr(FashionMNIST, "system_dirs", (str(system_dir),))
    dm = FashionMNIST()
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, KDZooError)
    for expected in (
        "Fashion-MNIST not found",
        "$KDZOO_DATA/fashion-mnist (skipped: $KDZOO_DATA is not set)",
        str(tmp_path / "home" / ".cache" / "kdzoo" / "data" / "fashion-mnist"),
        str(system_dir),
        str(system_dir / "FashionMNIST" / "raw"),
        "train-images-idx3-ubyte or train-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz",
        "apt-get install dataset-fashion-mnist",
        "--data.root DIR",
        "--data.download true",
    ):
        assert expected in message
    # setup() fails the same way, before touching anything else.
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")


def test_explicit_root_is_the_only_place_searched(tmp_path, monkeypatch):
    # Even with the data in $KDZOO_DATA and a system directory, a root that lacks it is an error:
    # the user asked for that directory.
    write_fmnist(tmp_path / "data" / "fashion-mnist")
    system_dir = write_fmnist(tmp_path / "usr-share-datasets")
    monkeypatch.setenv("KDZOO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(FashionMNIST, "system_dirs", (str(system_dir),))
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNIST(root=str(missing)).setup("fit")
    message = str(info.value)
    assert f"- {missing}\n" in message and f"- {missing / 'FashionMNIST' / 'raw'}\n" in message
    assert str(tmp_path / "data") not in message and str(system_dir) not in message
    assert "apt-get install dataset-fashion-mnist and leave --data.root unset" in message


def test_kdzoo_data_env_is_honoured(tmp_path, monkeypatch):
    env_dir = write_fmnist(tmp_path / "data" / "fashion-mnist" / "FashionMNIST" / "raw")
    monkeypatch.setenv("KDZOO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    dm = FashionMNIST(batch_size=4)
    assert dm.find_root() == env_dir
    dm.setup("fit")
    assert len(dm.test) == 20
    # An explicit root holding the data wins over $KDZOO_DATA ...
    explicit = write_fmnist(tmp_path / "explicit")
    assert FashionMNIST(root=str(explicit)).find_root() == explicit


def test_download_only_in_prepare_data(tmp_path, monkeypatch):
    calls = []

    def fake_download(self, directory):  # torchvision's layout, without the network
        calls.append(directory)
        write_fmnist(directory / "FashionMNIST" / "raw")

    monkeypatch.setattr(FashionMNIST, "download", fake_download)
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    dm = FashionMNIST(download=True)
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")  # setup() never downloads
    assert calls == []
    # Without root or $KDZOO_DATA, data goes to the user cache, which is searched afterwards.
    dm.prepare_data()
    cache = tmp_path / "home" / ".cache" / "kdzoo" / "data" / "fashion-mnist"
    assert calls == [cache]
    dm.setup("fit")
    assert len(dm.test) == 20
    dm.prepare_data()  # present now: nothing downloaded again
    assert len(calls) == 1
    # With $KDZOO_DATA set (and an empty cache), downloads go under it; with root, into root.
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    monkeypatch.setenv("KDZOO_DATA", str(tmp_path / "data"))
    FashionMNIST(download=True).prepare_data()
    assert calls[-1] == tmp_path / "data" / "fashion-mnist"
    FashionMNIST(root=str(tmp_path / "mine"), download=True).prepare_data()
    assert calls[-1] == tmp_path / "mine"


def test_debian_fashion_mnist():
    dm = FashionMNIST()
    if not DEBIAN_FMNIST.is_dir():
        # Without the package, the error must point at its location and at the package.
        with pytest.raises(DatasetNotFoundError, match=re.escape(str(DEBIAN_FMNIST))) as info:
            dm.prepare_data()
        assert "apt-get install dataset-fashion-mnist" in str(info.value)
        return
    dm.setup("fit")
    assert dm.find_root() == DEBIAN_FMNIST
    assert len(dm.train) + len(dm.val) == 60000 and len(dm.test) == 10000
    train_labels = np.concatenate([dm.train.targets, dm.val.targets])
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(dm.test.targets).tolist() == [1000] * 10
    # The hard-coded normalisation is the training set's pixel statistics.
    pixels = dm.train.images / 255.0
    assert pixels.mean() == pytest.approx(dm.mean[0], abs=5e-4)
    assert pixels.std() == pytest.approx(dm.std[0], abs=5e-4)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda data: data[:-5], "truncated"),
        (lambda data: data + b"\0", "trailing bytes"),
        (lambda data: b"\x12\x34" + data[2:], "not an IDX file"),
        (lambda data: data[:6], "truncated header"),
    ],
)
def test_malformed_idx_is_a_clear_error(tmp_path, corrupt, message):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(corrupt(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_fails_clearly_in_setup(fmnist_root):
    path = fmnist_root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    dm = FashionMNIST(root=str(fmnist_root))
    with pytest.raises(IDXFormatError, match="cannot decompress") as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


# -- CIFAR -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100])
@pytest.mark.parametrize("nested", [True, False])
def test_cifar_batches(tmp_path, cls, nested):
    directory = write_cifar(tmp_path, cls, nested=nested)
    dm = cls(root=str(tmp_path), batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.find_root() == directory
    assert (len(dm.train), len(dm.val), len(dm.test)) == (36, 4, 20)
    assert dm.class_names == [n.upper() for n in cls().class_names]  # read from the meta file
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Rows hold 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    test_file = CIFAR_SPECS[cls][2]
    rows = pickle.loads((directory / test_file).read_bytes(), encoding="latin1")["data"]
    expected = np.stack(
        [rows[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], -1
    )
    x, y = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(unnormalise(x, dm), expected[:8], atol=1e-3)
    assert y.tolist() == [i % dm.num_classes for i in range(8)]


def test_cifar_missing_error_has_no_apt_hint_but_download_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR100(root=str(tmp_path)).prepare_data()
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "apt-get" not in message
    assert "--data.download true" in message


class _Payload:
    """Pickles as a call to os.system: what a malicious "CIFAR" file could contain."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "payload-ran"
    data = pickle.dumps({"data": _Payload(marker), "labels": []}, protocol=2)
    refs = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert refs == {f"{os.system.__module__} system"}  # the payload is really in there
    path = tmp_path / "data_batch_1"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global .*system") as info:
        load_cifar_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # The same through a DataModule.
    directory = write_cifar(tmp_path / "c10", CIFAR10)
    (directory / "data_batch_3").write_bytes(data)
    with pytest.raises(UnsafePickleError):
        CIFAR10(root=str(tmp_path / "c10")).setup("fit")
    assert not marker.exists()


def test_restricted_unpickler_accepts_python2_numpy_names(tmp_path):
    # The original files name numpy.core.multiarray (numpy < 2); numpy 2 writes numpy._core.
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    data = pickle.dumps({"data": array}, protocol=2)
    module = np.empty(0).__reduce__()[0].__module__.encode()
    data = data.replace(module + b"\n", b"numpy.core.multiarray\n")
    (tmp_path / "batch").write_bytes(data)
    np.testing.assert_array_equal(load_cifar_pickle(tmp_path / "batch")["data"], array)


def test_corrupt_cifar_pickle_is_a_clear_error(tmp_path):
    directory = write_cifar(tmp_path, CIFAR10)
    path = directory / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        CIFAR10(root=str(tmp_path)).setup("test")


# -- ImageFolder -----------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    dm = ImageFolder(root=str(root), image_size=16, batch_size=4, val_fraction=0.2)
    # Classes come from the train folder, before setup.
    assert dm.class_names == ["ant", "bee", "cat"] and dm.num_classes == 3
    assert (dm.in_chans, dm.mean, dm.std) == (3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train), len(dm.val), len(dm.test)) == (12, 3, 6)
    assert not set(dm.train.indices) & set(dm.val.indices)
    # The val folder is the test split.
    assert dm.test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.parent.parent.name == "val" for p in dm.test.paths)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Eval: shorter side to int(16 / 0.875) = 18, then the central 16 x 16.
    path = dm.test.paths[0]
    reference = A.Compose([A.SmallestMaxSize(max_size=18), A.CenterCrop(16, 16)])
    expected = reference(image=np.array(Image.open(path).convert("RGB")))["image"]
    np.testing.assert_allclose(unnormalise(dm.test[0][0][None], dm)[0], expected, atol=1e-3)


def test_image_folder_greyscale(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    dm = ImageFolder(root=str(root), image_size=8, in_chans=1, batch_size=4)
    assert (dm.in_chans, dm.mean, dm.std) == (1, (0.449,), (0.226,))
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 1, 8, 8)
    rgb = ImageFolder(root=str(root), image_size=8, in_chans=1, grey_to_rgb=True)
    rgb.setup("test")
    assert rgb.in_chans == 3 and rgb.test[0][0].shape == (3, 8, 8)


def test_image_folder_val_classes_must_match(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "val" / "dog").mkdir()
    dm = ImageFolder(root=str(root), image_size=8)
    with pytest.raises(ValueError, match=r"same class folders.*not in train: \['dog'\]"):
        dm.setup("fit")


def test_image_folder_missing(tmp_path):
    dm = ImageFolder(root=str(tmp_path / "nope"), download=True)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nope") in message and "cannot download" in message
    assert "Expected files: train, val" in message
    with pytest.raises(DatasetNotFoundError):
        dm.num_classes  # noqa: B018  (the property reads the class folders)


# -- Digits ----------------------------------------------------------------------------------------


def test_digits_splits():
    def build(seed):
        dm = Digits(split_seed=seed, batch_size=32)
        dm.setup("fit")
        return dm

    dm = build(0)
    assert (len(dm.train), len(dm.val), len(dm.test)) == (1293, 144, 360)
    # Stratified: every class has its share of the test and val splits.
    assert set(np.bincount(dm.test.targets)) <= {35, 36, 37}
    assert np.bincount(dm.val.targets).min() >= 13
    other = build(1)
    # The test split is fixed; the validation split follows split_seed.
    np.testing.assert_array_equal(
        other.test.images[other.test.indices], dm.test.images[dm.test.indices]
    )
    assert not np.array_equal(other.val.indices, dm.val.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 32, 32) and y.dtype == torch.int64


def test_digits_normalisation_and_no_flip():
    images, _ = load_digits_uint8()
    assert images.shape == (1797, 8, 8, 1) and images.max() == 255
    dm = Digits(image_size=16)
    assert (images / 255).mean() == pytest.approx(dm.mean[0], abs=5e-4)
    assert (images / 255).std() == pytest.approx(dm.std[0], abs=5e-4)
    pipeline = dm.build_transform(train=True)
    assert not any(isinstance(t, A.HorizontalFlip | A.VerticalFlip) for t in pipeline.transforms)
    dm.setup("test")
    assert dm.test[0][0].shape == (1, 16, 16)


# -- in a Trainer ----------------------------------------------------------------------------------


class TinyClassifier(L.LightningModule):
    def __init__(self, in_chans: int, num_classes: int, image_size: int):
        super().__init__()
        self.net = torch.nn.Linear(in_chans * image_size**2, num_classes)
        self.steps = {"train": 0, "val": 0}

    def forward(self, x):
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        self.steps["train"] += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.steps["val"] += 1
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_in_lightning_trainer(tmp_path):
    dm = Digits(batch_size=16, train_subset=64, eval_subset=32, grey_to_rgb=True)
    # Built from the DataModule's properties before setup, as the CLI links them.
    model = TinyClassifier(dm.in_chans, dm.num_classes, dm.image_size)
    trainer = quiet_trainer(
        tmp_path,
        fast_dev_run=True,
    )
    trainer.fit(model, datamodule=dm)
    assert model.steps == {"train": 1, "val": 1}
    predictions = trainer.predict(model, datamodule=dm)
    assert predictions[0].shape == (16, 10)
