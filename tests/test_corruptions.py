"""kdzoo.corruptions: the 15 corruptions, their severities, determinism, and the written sets.

Images: 20 scikit-learn digits upsampled to 28x28 (grey, like Fashion-MNIST) and the same digits
coloured on a coloured background at 32x32 (RGB, like CIFAR): always available, no network.
"""

from __future__ import annotations

import gzip
import itertools
import json
import struct

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from kdzoo.corruptions import (
    CORRUPTIONS,
    METADATA_FILE,
    CorruptionError,
    corrupt,
    write_corruption_set,
)
from kdzoo.corruptions import functions as F
from kdzoo.corruptions.__main__ import main as cli_main
from kdzoo.errors import KDZooError


def _digits(n: int = 20) -> np.ndarray:
    return load_digits().images[:n] / 16.0


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    up = [cv2.resize(d, (28, 28), interpolation=cv2.INTER_LINEAR) for d in _digits()]
    return np.uint8(np.clip(np.stack(up) * 255, 0, 255))[..., None]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    images = []
    for d in _digits():
        ink, paper = rng.uniform(0.5, 1, 3), rng.uniform(0, 0.4, 3)
        mask = cv2.resize(d, (32, 32), interpolation=cv2.INTER_LINEAR)
        mask = np.clip((mask - 0.4) * 4, 0, 1)[..., None]  # sharp edges, as in photographs
        images.append(mask * ink + (1 - mask) * paper)
    return np.uint8(np.clip(np.stack(images) * 255, 0, 255))


def distances(images: np.ndarray, name: str, seed: int = 0) -> list[float]:
    """Mean absolute pixel distance to the clean images at severities 1..5."""
    return [
        float(np.abs(corrupt(images, name, s, seed).astype(np.int16) - images).mean())
        for s in range(1, 6)
    ]


# The reference's tables make these grow with severity on every image set we tried.
MONOTONE = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "jpeg_compression",
)
# Not monotone in pixel distance, by the reference's own parameters (CIFAR-10-C tables):
# glass blur's severities 1..3 differ only by a small blur sigma and 4 -> 5 swaps a larger
# sigma for the same displacement; motion blur's 3 -> 4 grows the radius at a sigma (2) whose
# kernel is ~0 past 6 pixels; frost at 3 -> 4 darkens the image (0.9 -> 0.85) with the same
# frost weight; pixelate's int(side * c) can land on the same size twice.
LOOSE = ("glass_blur", "motion_blur", "frost", "pixelate")


def test_the_benchmark_order():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert set(MONOTONE) | set(LOOSE) | {"elastic_transform"} == set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_every_corruption_changes_the_images_and_severity_adds_damage(name, kind, request):
    images = request.getfixturevalue(kind)
    d = distances(images, name)
    # Visible at every severity (on 0..255; JPEG at quality 80 and a 0.3-pixel defocus are the
    # mildest), clearly so at severity 5.
    assert min(d) > 0.3, d
    assert d[4] > 2.0, d
    if name in MONOTONE:
        assert all(a <= b for a, b in itertools.pairwise(d)), d
    elif name in LOOSE:
        assert d[4] > d[0] and np.mean(d[3:]) > np.mean(d[:2]), d


def test_elastic_damage_grows_once_the_affine_jitter_is_set_aside(grey, monkeypatch):
    # The reference table shrinks the affine jitter (8% -> 3% of the side) while it grows the
    # elastic field, so the plain pixel distance falls with severity; the field alone grows.
    assert distances(grey, "elastic_transform")[0] > distances(grey, "elastic_transform")[4]
    monkeypatch.setattr(F, "ELASTIC", tuple((a, s, 0.0) for a, s, _ in F.ELASTIC))
    d = distances(grey, "elastic_transform")
    assert d[0] == 0.0 and all(a < b for a, b in itertools.pairwise(d)), d


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_for_a_seed_and_shapes_kept(grey, rgb, name):
    for images in (grey, rgb):
        first = corrupt(images, name, 3, seed=7)
        assert first.dtype == np.uint8 and first.shape == images.shape
        np.testing.assert_array_equal(first, corrupt(images, name, 3, seed=7))
    # The random corruptions follow the seed; no global state is used or changed.
    state = np.random.get_state()[1].copy()
    other = corrupt(grey, name, 3, seed=8)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    random_ones = set(CORRUPTIONS) - {
        "defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"
    }  # fmt: skip
    assert (not np.array_equal(other, corrupt(grey, name, 3, seed=7))) == (name in random_ones)


def test_an_image_does_not_depend_on_the_calls_before_it(grey):
    alone = corrupt(grey, "snow", 4, seed=1)
    corrupt(grey, "fog", 2, seed=1)  # other draws in between change nothing
    np.testing.assert_array_equal(corrupt(grey, "snow", 4, seed=1), alone)
    # Image i has its own generator: the first images of a longer batch are unchanged.
    np.testing.assert_array_equal(corrupt(grey[:5], "snow", 4, seed=1), alone[:5])


@pytest.mark.parametrize(
    "name",
    ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow", "fog", "brightness",
     "contrast", "elastic_transform", "pixelate", "jpeg_compression"],
)  # fmt: skip
def test_grey_images_stay_grey_and_match_their_rgb_copy(grey, name):
    # Grey images are corrupted as one channel; where the randomness is not per channel the
    # result is what the same image replicated to RGB gets (snow: up to float rounding).
    out = corrupt(grey, name, 4, seed=3)
    assert out.shape == grey.shape == (20, 28, 28, 1)
    as_rgb = corrupt(np.repeat(grey, 3, axis=-1), name, 4, seed=3)
    for k in range(3):
        assert np.abs(as_rgb[..., k].astype(int) - out[..., 0]).max() <= 1


def test_grey_noise_keeps_its_full_strength(grey):
    # Noise drawn on the single channel: about the table's std (0.10 of 255 at severity 5) away
    # from mid-grey pixels, not std / sqrt(3) as averaging three noisy channels would give.
    flat = np.full((50, 16, 16, 1), 128, np.uint8)
    noisy = corrupt(flat, "gaussian_noise", 5).astype(float)
    assert np.std(noisy - 128) == pytest.approx(0.10 * 255, rel=0.05)


def test_frost_photographs_are_used_when_given(grey, tmp_path):
    rng = np.random.default_rng(0)
    for name in F.FROST_FILES:
        photo = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / name), photo)
    photo = corrupt(grey, "frost", 5, frost_dir=tmp_path)
    stand_in = corrupt(grey, "frost", 5)
    assert photo.shape == grey.shape and not np.array_equal(photo, stand_in)
    with pytest.raises(FileNotFoundError, match="frost"):
        corrupt(grey, "frost", 5, frost_dir=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("blur", 1), "unknown corruption 'blur'"),
        (("fog", 0), "severity must be one of 1..5"),
        (("fog", 6), "severity must be one of 1..5"),
        (("fog", 1, -1), "seed must be a non-negative integer"),
    ],
)
def test_bad_arguments(grey, args, message):
    with pytest.raises(CorruptionError, match=message):
        corrupt(grey, *args)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 28, 28), np.uint8), r"uint8 array \(N, H, W, C\)"),
        (np.zeros((2, 28, 28, 1), np.float32), r"uint8 array \(N, H, W, C\)"),
        (np.zeros((2, 28, 28, 2), np.uint8), "1 or 3 channels"),
        (np.zeros((2, 4, 28, 1), np.uint8), "at least 8x8"),
    ],
)
def test_bad_images(images, message):
    with pytest.raises(CorruptionError, match=message):
        corrupt(images, "fog", 1)


# -- writing a set -------------------------------------------------------------------------------


def test_written_layout(grey, tmp_path):
    images, labels = grey[:6], np.arange(6) % 3
    target = write_corruption_set(
        images, labels, tmp_path, "Tiny-C", corruptions=["fog", "pixelate"], seed=4
    )
    assert target == tmp_path / "Tiny-C"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["fog.npy", "pixelate.npy", "labels.npy", METADATA_FILE]
    )
    stored_labels = np.load(target / "labels.npy")
    assert stored_labels.dtype == np.int64
    np.testing.assert_array_equal(stored_labels, np.tile(labels, 5))
    for name in ("fog", "pixelate"):
        stack = np.load(target / f"{name}.npy")
        assert stack.dtype == np.uint8 and stack.shape == (30, 28, 28, 1)
        for s in range(1, 6):  # severity s is the slice [(s - 1) N, s N)
            np.testing.assert_array_equal(stack[(s - 1) * 6 : s * 6], corrupt(images, name, s, 4))
    meta = json.loads((target / METADATA_FILE).read_text())
    assert meta["severities"] == [1, 2, 3, 4, 5] and meta["seed"] == 4
    assert meta["image_shape"] == [28, 28, 1] and meta["num_images"] == 6
    assert set(meta["distance"]) == {"fog", "pixelate"} and meta["distance"]["fog"]["5"] > 0
    # Nothing left behind but the set.
    assert [p.name for p in tmp_path.iterdir()] == ["Tiny-C"]


def test_never_overwrites_silently(grey, tmp_path):
    args = (grey[:3], [0, 1, 2], tmp_path, "Tiny-C")
    first = write_corruption_set(*args, corruptions=["contrast"])
    before = np.load(first / "contrast.npy")
    with pytest.raises(CorruptionError, match=r"already exists and is not empty.*overwrite"):
        write_corruption_set(*args, corruptions=["brightness"])
    np.testing.assert_array_equal(np.load(first / "contrast.npy"), before)
    write_corruption_set(*args, corruptions=["brightness"], overwrite=True)
    assert sorted(p.name for p in first.glob("*.npy")) == ["brightness.npy", "labels.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["Tiny-C"]
    # An empty folder is not a set: it is filled without overwrite.
    (tmp_path / "Empty-C").mkdir()
    write_corruption_set(grey[:3], [0, 1, 2], tmp_path, "Empty-C", corruptions=["contrast"])


def test_a_failed_write_leaves_nothing(grey, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_corruption_set(grey[:3], [0, 1, 2], tmp_path, "Tiny-C", corruptions=["fog"])
    assert list(tmp_path.iterdir()) == []


def test_severity_subset_and_two_processes_give_the_same_bytes(grey, tmp_path):
    kwargs = {"corruptions": ["snow", "frost"], "severities": [2, 5], "seed": 1}
    one = write_corruption_set(grey[:4], [0] * 4, tmp_path / "a", "S-C", workers=1, **kwargs)
    two = write_corruption_set(grey[:4], [0] * 4, tmp_path / "b", "S-C", workers=2, **kwargs)
    for name in ("snow.npy", "frost.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(one / name), np.load(two / name))
    assert np.load(one / "snow.npy").shape == (8, 28, 28, 1)
    assert json.loads((one / METADATA_FILE).read_text())["severities"] == [2, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": [0, 1]}, "labels must be 3 integers"),
        ({"labels": [0, -1, 2]}, "non-negative"),
        ({"severities": [1, 1]}, "distinct"),
        ({"corruptions": ["fog", "fog"]}, "distinct"),
        ({"corruptions": ["spatter"]}, "unknown corruption"),
        ({"name": "../x"}, "plain folder name"),
        ({"workers": 0}, "workers must be >= 1"),
    ],
)
def test_write_bad_arguments(grey, tmp_path, kwargs, message):
    args = {"labels": [0, 1, 2], "name": "T-C", **kwargs}
    with pytest.raises(CorruptionError, match=message):
        write_corruption_set(grey[:3], args.pop("labels"), tmp_path, args.pop("name"), **args)


# -- the command line ----------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_cli_from_a_datamodule_and_from_npy(grey, tmp_path, capsys):
    # Fashion-MNIST IDX files made from the digits: the test split is what gets corrupted.
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir()
    labels = np.arange(20) % 10
    for name, array in (
        ("train-images-idx3-ubyte", grey[:10, ..., 0]),
        ("train-labels-idx1-ubyte", labels[:10]),
        ("t10k-images-idx3-ubyte", grey[..., 0]),
        ("t10k-labels-idx1-ubyte", labels),
    ):
        (fmnist / f"{name}.gz").write_bytes(_idx(array))
    out = tmp_path / "out"
    argv = ["FashionMNIST", "--root", str(fmnist), "--out", str(out), "--num", "4"]
    target = cli_main([*argv, "--corruptions", "contrast", "fog", "--workers", "1"])
    assert target == out / "FashionMNIST-C"
    stack = np.load(target / "fog.npy")
    np.testing.assert_array_equal(stack[4:8], corrupt(grey[:4], "fog", 2, 0))
    printed = capsys.readouterr().out
    assert "FashionMNIST-C: 4 images (28, 28, 1)" in printed and "fog" in printed

    with pytest.raises(SystemExit) as info:  # exists: refused, with the hint
        cli_main([*argv, "--corruptions", "fog", "--workers", "1"])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err

    np.save(tmp_path / "clean.npy", grey[:3, ..., 0])  # (N, H, W) is read as grey
    np.save(tmp_path / "y.npy", np.array([2, 0, 1]))
    npy = ["--npy", str(tmp_path / "clean.npy"), str(tmp_path / "y.npy")]
    target = cli_main([*npy, "--out", str(out), "--corruptions", "brightness", "--workers", "1"])
    assert target == out / "clean-C" and np.load(target / "brightness.npy").shape == (15, 28, 28, 1)


def test_cli_errors(tmp_path, capsys):
    for argv, message in (
        (["--out", str(tmp_path)], "either a dataset name or --npy"),
        (["ImageFolder", "--out", str(tmp_path)], "unknown dataset 'ImageFolder'"),
    ):
        with pytest.raises(SystemExit):
            cli_main(argv)
        assert message in capsys.readouterr().err
    assert issubclass(CorruptionError, KDZooError)
