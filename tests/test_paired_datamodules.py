"""Tests for the paired-modality DataModules on tiny files written in the real layouts.

References (min-max normalisation, the 60/20/20 cut, label remapping, the sensor's block
averages, the occluder's rectangle) are written here from the dataset descriptions and the
MST-Distill code's conventions (kdzoo spec ``crossmodal_active.md`` §1.2-1.3), never by calling
the code under test.
"""

from __future__ import annotations

import csv
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from kdzoo.datamodules import (
    AVMNIST,
    DataError,
    DatasetNotFoundError,
    FashionMNISTPairs,
    FeaturePairs,
    NYUDepthV2,
)
from kdzoo.datamodules.paired import MissingDataFileError
from kdzoo.errors import KDZooError


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    # Neither the user's $KDZOO_DATA nor their ~/.cache/kdzoo may leak into a test.
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def ref_min_max(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min())


def ref_split(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """MST-Distill's ``get_indices``: a permutation cut at int(0.6 n) and int(0.8 n)."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(n * 0.6), int(n * 0.8)
    return tuple(np.sort(p) for p in (perm[:a], perm[a:b], perm[b:]))


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values(), strict=True))


# -- AV-MNIST -------------------------------------------------------------------------------------


def write_avmnist(root: Path, n_train: int = 10, n_test: int = 5, flat: bool = True) -> dict:
    rng = np.random.default_rng(0)
    data = {}
    for part, n in (("train", n_train), ("test", n_test)):
        image = rng.integers(0, 256, (n, 784) if flat else (n, 28, 28)).astype(np.float64)
        audio = rng.normal(3.0, 2.0, (n, 112, 112)).astype(np.float32)
        labels = np.arange(n) % 10
        for sub, name, array in (
            ("image", f"{part}_data.npy", image),
            ("audio", f"{part}_data.npy", audio),
            ("", f"{part}_labels.npy", labels),
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
            np.save(root / sub / name, array)
        data[part] = (image, audio, labels)
    return data


@pytest.mark.parametrize("flat", [True, False])
def test_avmnist_items_are_min_max_normalised_per_sample(tmp_path, flat):
    data = write_avmnist(tmp_path, flat=flat)
    dm = AVMNIST(root=str(tmp_path), batch_size=4, val_fraction=0.2)
    # The contract's properties, before setup().
    assert dm.modalities == ("image", "audio")
    assert dm.modality_shapes == ((1, 28, 28), (1, 112, 112))
    assert dm.num_classes == 10 and dm.class_names == list("0123456789")
    assert dm.task == "classification"
    dm.setup("fit")
    image, audio, labels = data["train"]
    for i, j in enumerate(dm.train.indices):
        x1, x2, y = dm.train[i]
        np.testing.assert_allclose(x1.numpy().ravel(), ref_min_max(image[j]).ravel(), atol=1e-6)
        np.testing.assert_allclose(x2[0].numpy(), ref_min_max(audio[j]), atol=1e-6)
        assert y == labels[j]
    x1, x2, y = next(iter(dm.train_dataloader()))
    assert x1.shape == (4, 1, 28, 28) and x2.shape == (4, 1, 112, 112) and y.shape == (4,)
    assert x1.dtype == x2.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.all(x1.flatten(1).amin(1) == 0) and torch.all(x1.flatten(1).amax(1) == 1)


def test_avmnist_official_split_holds_val_out_of_train(tmp_path):
    data = write_avmnist(tmp_path, n_train=20, n_test=5)
    dm = AVMNIST(root=str(tmp_path), val_fraction=0.25, split_seed=3)
    dm.setup()
    perm = np.random.default_rng(3).permutation(20)  # kdzoo's hold-out rule
    np.testing.assert_array_equal(dm.val.indices, np.sort(perm[:5]))
    np.testing.assert_array_equal(dm.train.indices, np.sort(perm[5:]))
    assert len(dm.test) == 5 and dm.predict is dm.test
    x1, _, _ = dm.test[4]
    np.testing.assert_allclose(x1.numpy().ravel(), ref_min_max(data["test"][0][4]), atol=1e-6)
    other = AVMNIST(root=str(tmp_path), val_fraction=0.25, split_seed=4)
    other.setup()
    assert not np.array_equal(other.val.indices, dm.val.indices)


def test_avmnist_random_split_pools_train_and_test_like_the_repo(tmp_path):
    data = write_avmnist(tmp_path, n_train=10, n_test=5)
    dm = AVMNIST(root=str(tmp_path), split="random", split_seed=2)
    dm.setup()
    for got, want in zip((dm.train, dm.val, dm.test), ref_split(15, 2), strict=True):
        np.testing.assert_array_equal(got.indices, want)
    # Pooled index 10 + k is the k-th test sample (train first, then test, as the repo).
    split = next(s for s in (dm.train, dm.val, dm.test) if 12 in s.indices)
    _, x2, y = split[int(np.flatnonzero(split.indices == 12)[0])]
    np.testing.assert_allclose(x2[0].numpy(), ref_min_max(data["test"][1][2]), atol=1e-6)
    assert y == data["test"][2][2]


def test_avmnist_random_split_can_follow_the_repos_permutation_file(tmp_path):
    write_avmnist(tmp_path, n_train=10, n_test=5)
    perm = np.random.default_rng(9).permutation(15)
    write_csv(tmp_path / "idx.csv", {"group_0": np.arange(15), "group_1": perm})
    dm = AVMNIST(
        root=str(tmp_path), split="random", split_seed=1, split_file=str(tmp_path / "idx.csv")
    )
    dm.setup()
    np.testing.assert_array_equal(dm.train.indices, np.sort(perm[:9]))
    np.testing.assert_array_equal(dm.test.indices, np.sort(perm[12:]))
    with pytest.raises(DataError, match="split_file"):
        AVMNIST(root=str(tmp_path), split_file=str(tmp_path / "idx.csv"))  # official split


def test_avmnist_missing_modality_file_is_named(tmp_path):
    write_avmnist(tmp_path)
    (tmp_path / "audio" / "train_data.npy").unlink()
    with pytest.raises(MissingDataFileError) as err:
        AVMNIST(root=str(tmp_path)).setup()
    message = str(err.value)
    assert "audio/train_data.npy" in message and "modality 'audio'" in message
    assert "image/train_data.npy" not in message  # only what is missing
    assert isinstance(err.value, DataError) and isinstance(err.value, DatasetNotFoundError)


def test_avmnist_nothing_there_says_where_kdzoo_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        AVMNIST().prepare_data()
    message = str(err.value)
    assert "Looked in" in message and "avmnist" in message and "MultiBench" in message


@pytest.mark.parametrize(
    ("file", "array", "message"),
    [
        ("audio/train_data.npy", np.zeros((9, 112, 112)), "image has 10 items, audio has 9"),
        ("train_labels.npy", np.zeros(11, dtype=int), "labels has 11 items"),
        ("audio/train_data.npy", np.zeros((10, 100, 100)), r"expected \(N, 112, 112\)"),
        ("image/train_data.npy", np.zeros((10, 27, 27)), r"expected \(N, 784\)"),
        ("train_labels.npy", np.full(10, 10), r"expected 0\.\.9"),
        ("train_labels.npy", np.full(10, 0.5), "integer class ids"),
    ],
)
def test_avmnist_malformed_files(tmp_path, file, array, message):
    write_avmnist(tmp_path)
    np.save(tmp_path / file, array)
    with pytest.raises(DataError, match=message):
        AVMNIST(root=str(tmp_path)).setup()


# -- NYU Depth V2 ---------------------------------------------------------------------------------

N, H, W = 10, 6, 8  # H != W catches any transposition mix-up


def write_nyu(root: Path, labels_in: str = "mat", n_labels: int = N) -> dict:
    """The labelled .mat in MATLAB v7.3 axis order (HDF5 reverses MATLAB's), plus labels40."""
    import h5py  # the optional dependency of NYUDepthV2 (extra "nyu")

    rng = np.random.default_rng(1)
    rgb = rng.integers(10, 200, (N, 3, H, W)).astype(np.uint8)  # true (N, C, H, W)
    depth = rng.uniform(0.5, 9.0, (N, H, W)).astype(np.float32)
    labels = rng.integers(0, 41, (n_labels, H, W)).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = rgb.transpose(0, 1, 3, 2)  # (N, 3, W, H)
        f["depths"] = depth.transpose(0, 2, 1)  # (N, W, H)
        if labels_in == "inside":  # the repo's merged file
            f["labels40"] = labels.transpose(0, 2, 1)
    if labels_in == "mat":  # ankurhanda/nyuv2-meta-data: MATLAB v5, (H, W, N)
        savemat(root / "labels40.mat", {"labels40": labels.transpose(1, 2, 0)})
    elif labels_in == "mat73":  # as MATLAB's save -v7.3: HDF5 after a 512-byte header block
        with h5py.File(root / "labels40.mat", "w", userblock_size=512) as f:
            f["labels40"] = labels.transpose(0, 2, 1)
        with open(root / "labels40.mat", "r+b") as f:
            f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + bytes(8) + b"\x00\x02IM")
    elif labels_in == "npy":
        np.save(root / "labels40.npy", labels)
    return {"rgb": rgb, "depth": depth, "labels": labels}


@pytest.mark.parametrize("labels_in", ["mat", "mat73", "npy", "inside"])
def test_nyu_reads_transposes_normalises_and_remaps(tmp_path, labels_in):
    data = write_nyu(tmp_path, labels_in)
    dm = NYUDepthV2(root=str(tmp_path), image_size=(H, W), batch_size=3)
    assert dm.modalities == ("rgb", "depth") and dm.task == "segmentation"
    assert dm.modality_shapes == ((3, H, W), (1, H, W)) and dm.ignore_index == 255
    assert (
        dm.num_classes == 40 and dm.class_names[0] == "wall" and dm.class_names[-1] == "otherprop"
    )
    dm.setup()
    rgb = data["rgb"].astype(np.float64)
    lo, hi = rgb.min(axis=(0, 2, 3)), rgb.max(axis=(0, 2, 3))  # per channel, whole dataset
    for split in (dm.train, dm.val, dm.test):
        for i, j in enumerate(split.indices):
            x1, x2, y = split[i]
            want = (rgb[j] - lo[:, None, None]) / (hi - lo)[:, None, None]
            np.testing.assert_allclose(x1.numpy(), want, atol=1e-6)
            np.testing.assert_allclose(x2[0].numpy(), ref_min_max(data["depth"][j]), atol=1e-6)
            raw = data["labels"][j].astype(np.int64)
            np.testing.assert_array_equal(y.numpy(), np.where(raw == 0, 255, raw - 1))
    x1, x2, y = next(iter(dm.test_dataloader()))
    assert x1.shape == (2, 3, H, W) and x2.shape == (2, 1, H, W) and y.shape == (2, H, W)
    assert x1.dtype == x2.dtype == torch.float32 and y.dtype == torch.int64


def test_nyu_random_split_and_the_repos_permutation_file(tmp_path):
    write_nyu(tmp_path)
    dm = NYUDepthV2(root=str(tmp_path), image_size=(H, W), split_seed=5)
    dm.setup()
    for got, want in zip((dm.train, dm.val, dm.test), ref_split(N, 5), strict=True):
        np.testing.assert_array_equal(got.indices, want)
    perm = np.random.default_rng(0).permutation(N)
    write_csv(tmp_path / "NYU-Depth-V2_indices.csv", {"group_0": perm})
    dm = NYUDepthV2(
        root=str(tmp_path), image_size=(H, W), split_file=str(tmp_path / "NYU-Depth-V2_indices.csv")
    )
    dm.setup()
    assert [len(s) for s in (dm.train, dm.val, dm.test)] == [6, 2, 2]
    np.testing.assert_array_equal(dm.val.indices, np.sort(perm[6:8]))


def test_nyu_keep_void_id_and_resizing(tmp_path):
    data = write_nyu(tmp_path, "npy")
    dm = NYUDepthV2(root=str(tmp_path), image_size=(3, 4), keep_void_id=True)
    assert dm.num_classes == 41 and dm.class_names[:2] == ["void", "wall"]
    assert dm.modality_shapes == ((3, 3, 4), (1, 3, 4))
    dm.setup()
    x1, x2, y = dm.train[0]
    assert x1.shape == (3, 3, 4) and x2.shape == (1, 3, 4) and y.shape == (3, 4)
    assert x1.min() >= 0 and x1.max() <= 1 and x2.min() >= 0 and x2.max() <= 1
    # Nearest-neighbour masks: every value is one of the stored ids (void -> 255), none blended.
    raw = data["labels"][dm.train.indices[0]].astype(np.int64)
    assert set(y.unique().tolist()) <= set(np.where(raw == 0, 255, raw).ravel().tolist())


def test_nyu_errors(tmp_path, monkeypatch):
    write_nyu(tmp_path / "none", labels_in="none")
    with pytest.raises(MissingDataFileError, match=r"labels40\.mat.*nyuv2-meta-data"):
        NYUDepthV2(root=str(tmp_path / "none"), image_size=(H, W)).setup()
    write_nyu(tmp_path / "short", labels_in="npy", n_labels=N - 1)
    with pytest.raises(DataError, match=r"labels40.npy has shape \(9, 6, 8\), expected"):
        NYUDepthV2(root=str(tmp_path / "short"), image_size=(H, W)).setup()
    with pytest.raises(DatasetNotFoundError, match=r"nyu_depth_v2_labeled\.mat"):
        NYUDepthV2(root=str(tmp_path / "empty")).prepare_data()
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if it were not installed
    with pytest.raises(KDZooError, match="pip install h5py"):
        NYUDepthV2(root=str(tmp_path / "short"), image_size=(H, W)).setup()


# -- pre-extracted feature pairs ------------------------------------------------------------------


def write_features(root: Path, layout: str, sizes=(12, 5, 5), dims=(6, 4)) -> dict:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    names = ("train", "val", "test") if layout == "split" else ("",)
    sizes = sizes if layout == "split" else (sum(sizes),)
    data = {}
    for split, n in zip(names, sizes, strict=True):
        prefix = f"{split}_" if split else ""
        arrays = (rng.normal(size=(n, dims[0])), rng.normal(size=(n, dims[1])), np.arange(n) % 3)
        for suffix, array in zip(("m1", "m2", "labels"), arrays, strict=True):
            np.save(root / f"{prefix}{suffix}.npy", array)
        data[split] = arrays
    return data


def test_feature_pairs_split_layout(tmp_path):
    data = write_features(tmp_path, "split")
    dm = FeaturePairs(root=str(tmp_path), batch_size=4)
    assert dm.modalities == ("image", "text") and dm.modality_shapes == ((6,), (4,))
    assert dm.num_classes == 3 and dm.class_names == ["0", "1", "2"]
    dm.setup()
    assert [len(s) for s in (dm.train, dm.val, dm.test)] == [12, 5, 5]
    x1, x2, y = next(iter(dm.val_dataloader()))
    assert x1.dtype == x2.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x1.numpy(), data["val"][0][:4], rtol=1e-6)  # stored values
    np.testing.assert_allclose(x2.numpy(), data["val"][1][:4], rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), data["val"][2][:4])


def test_feature_pairs_single_layout_is_split_60_20_20(tmp_path):
    write_features(tmp_path, "single")  # 22 samples
    (tmp_path / "class_names.txt").write_text("low\nmid\nhigh\nspare\n")
    dm = FeaturePairs(root=str(tmp_path), modalities=("audio", "video"), split_seed=7)
    assert dm.modalities == ("audio", "video") and dm.class_names == ["low", "mid", "high", "spare"]
    dm.setup()
    for got, want in zip((dm.train, dm.val, dm.test), ref_split(22, 7), strict=True):
        np.testing.assert_array_equal(got.indices, want)
    assert [len(s) for s in (dm.train, dm.val, dm.test)] == [13, 4, 5]


def test_feature_pairs_subsets_are_seeded_and_independent(tmp_path):
    write_features(tmp_path, "split")
    a = FeaturePairs(root=str(tmp_path), train_subset=4, eval_subset=2)
    b = FeaturePairs(root=str(tmp_path), train_subset=6, eval_subset=2)
    a.setup(), b.setup()
    assert len(a.train) == 4 and len(a.val) == len(a.test) == 2
    np.testing.assert_array_equal(a.val.indices, b.val.indices)  # not moved by train_subset


def test_feature_pairs_found_under_kdzoo_data_and_loaded_by_workers(tmp_path, monkeypatch):
    write_features(tmp_path / "data" / "feature_pairs", "split")
    monkeypatch.setenv("KDZOO_DATA", str(tmp_path / "data"))
    main, workers = FeaturePairs(batch_size=5), FeaturePairs(batch_size=5, num_workers=1)
    for dm in (main, workers):
        dm.setup()
    for a, b in zip(main.test_dataloader(), workers.test_dataloader(), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_feature_pairs_errors(tmp_path):
    write_features(tmp_path / "a", "split")
    (tmp_path / "a" / "train_m2.npy").unlink()
    with pytest.raises(MissingDataFileError, match=r"train_m2.npy \(modality 'text', train split"):
        FeaturePairs(root=str(tmp_path / "a")).setup()
    write_features(tmp_path / "b", "single")
    np.save(tmp_path / "b" / "m2.npy", np.zeros((21, 4)))
    with pytest.raises(DataError, match="image has 22 items, text has 21 items"):
        FeaturePairs(root=str(tmp_path / "b")).setup()
    np.save(tmp_path / "b" / "m2.npy", np.zeros((22, 4, 1)))
    with pytest.raises(DataError, match=r"m2.npy has shape \(22, 4, 1\), expected \(N, D\)"):
        FeaturePairs(root=str(tmp_path / "b")).setup()
    write_features(tmp_path / "c", "single")
    (tmp_path / "c" / "class_names.txt").write_text("one\ntwo\n")  # labels go up to 2
    with pytest.raises(DataError, match="label 2 is out of range for 2 classes"):
        _ = FeaturePairs(root=str(tmp_path / "c")).num_classes
    with pytest.raises(DataError, match="modalities"):
        FeaturePairs(modalities=("image", "image"))


# -- Fashion-MNIST pairs --------------------------------------------------------------------------


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_root(tmp_path) -> tuple[str, np.ndarray]:
    """30 train / 10 test textured items (rectangles and discs) on black, like Fashion-MNIST."""
    rng = np.random.default_rng(3)
    images = np.zeros((40, 28, 28), dtype=np.uint8)
    y, x = np.mgrid[:28, :28]
    for k, image in enumerate(images):
        texture = rng.integers(40, 256, (28, 28))
        if k % 2:
            top, left = rng.integers(2, 8, 2)
            shape = (y >= top) & (y < top + 18) & (x >= left) & (x < left + 14)
        else:
            shape = (y - 14) ** 2 + (x - 13) ** 2 < rng.integers(40, 120)
        image[shape] = texture[shape]
    labels = np.arange(40) % 10
    root = tmp_path / "fmnist"
    root.mkdir()
    for name, array in (
        ("train-images-idx3-ubyte", images[:30]),
        ("train-labels-idx1-ubyte", labels[:30]),
        ("t10k-images-idx3-ubyte", images[30:]),
        ("t10k-labels-idx1-ubyte", labels[30:]),
    ):
        (root / f"{name}.gz").write_bytes(idx_gz(array))
    return str(root), images


def all_items(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    items = [split[i] for i in range(len(split))]
    return tuple(np.stack([np.asarray(item[k]) for item in items]) for k in range(3))


def test_fashion_pairs_are_deterministic_per_pair_seed(fmnist_root):
    root, _ = fmnist_root
    first, again, other = (FashionMNISTPairs(root=root, pair_seed=s) for s in (0, 0, 1))
    for dm in (first, again, other):
        dm.setup()
    assert first.modalities == ("camera", "sensor") and first.num_classes == 10
    assert first.modality_shapes == ((1, 28, 28), (1, 14, 14))
    a, b, c = (all_items(dm.test) for dm in (first, again, other))
    for k in range(3):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    np.testing.assert_array_equal(a[2], np.arange(30, 40) % 10)  # the official test split
    assert a[0].dtype == a[1].dtype == np.float32
    assert a[0].min() >= 0 and a[0].max() <= 1 and a[1].min() >= 0 and a[1].max() <= 1


def test_fashion_pairs_camera_hides_a_rectangle_of_the_item(fmnist_root):
    root, images = fmnist_root
    dm = FashionMNISTPairs(root=root, camera_noise=0.0, val_fraction=0.2)
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (24, 6, 10)
    coverage = []
    for split, offset in ((dm.train, 0), (dm.val, 0), (dm.test, 30)):
        for i, j in enumerate(split.indices):
            camera, clean = split[i][0][0].numpy(), images[offset + j] / np.float32(255)
            changed = np.argwhere(np.abs(camera - clean) > 1e-6)
            (top, left), (bottom, right) = changed.min(0), changed.max(0) + 1
            box = np.zeros((28, 28), dtype=bool)
            box[top:bottom, left:right] = True
            # One constant grey rectangle; every other pixel is the item image untouched.
            np.testing.assert_allclose(camera[box], camera[top, left], atol=1e-6)
            assert 0.2 <= camera[top, left] <= 0.8
            np.testing.assert_allclose(camera[~box], clean[~box], atol=1e-6)
            item = images[offset + j] > 25
            rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
            assert rows[0] <= top and bottom <= rows[-1] + 1
            assert cols[0] <= left and right <= cols[-1] + 1
            coverage.append((box & item).sum() / item.sum())
    assert 0.38 <= np.mean(coverage) <= 0.52
    assert min(coverage) >= 0.25 and max(coverage) <= 0.65


@pytest.mark.parametrize(("cells", "size"), [(7, 14), (7, 28), (14, 14)])
def test_fashion_pairs_sensor_is_the_coarse_unoccluded_silhouette(fmnist_root, cells, size):
    root, images = fmnist_root
    dm = FashionMNISTPairs(root=root, sensor_cells=cells, sensor_size=size, sensor_noise=0.0)
    assert dm.modality_shapes[1] == (1, size, size)
    dm.setup()
    block, factor = 28 // cells, size // cells
    for i, j in enumerate(dm.test.indices):
        sensor = dm.test[i][1][0].numpy()
        mask = images[30 + j] > 25
        want = np.zeros((size, size))
        for u in range(size):
            for v in range(size):
                cu, cv = u // factor, v // factor  # the coarse cell this output pixel shows
                want[u, v] = mask[
                    cu * block : (cu + 1) * block, cv * block : (cv + 1) * block
                ].mean()
        np.testing.assert_allclose(sensor, want, atol=1e-6)
    other = FashionMNISTPairs(
        root=root, sensor_cells=cells, sensor_size=size, sensor_noise=0.0, pair_seed=5
    )
    other.setup()
    # The occluders move with pair_seed; the sensor, which sees the whole item, does not.
    np.testing.assert_array_equal(all_items(other.test)[1], all_items(dm.test)[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"occlusion": (0.6, 0.5)}, "occlusion"),
        ({"occlusion": (0.0, 0.5)}, "occlusion"),
        ({"sensor_cells": 5}, "sensor_cells"),
        ({"sensor_size": 15}, "sensor_size"),
        ({"camera_noise": -0.1}, "camera_noise"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_fashion_pairs_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        FashionMNISTPairs(**kwargs)


def test_fashion_pairs_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="FashionMNIST --download"):
        FashionMNISTPairs(root=str(tmp_path / "nothing")).setup()


def test_constant_samples_normalise_to_zeros_not_nan(tmp_path):
    # MST-Distill divides by max - min unguarded; a blank image must not turn into NaNs here.
    write_avmnist(tmp_path)
    image = np.load(tmp_path / "image" / "test_data.npy")
    image[0] = 7.0
    np.save(tmp_path / "image" / "test_data.npy", image)
    dm = AVMNIST(root=str(tmp_path))
    dm.setup()
    x1, x2, _ = dm.test[0]
    assert torch.all(x1 == 0) and torch.isfinite(x2).all()
