"""CorruptionStream: stream order, blocks, batches, normalisation, errors and the CLI link.

The sets are generated in tmp dirs with every image's pixels encoding where it comes from
(corruption, severity, index), so the order of a stream can be read back from its batches.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.cli import KDCLI
from kdzoo.datamodules import (
    CIFAR10,
    CIFAR100,
    CorruptionStream,
    DataError,
    DatasetNotFoundError,
    FashionMNIST,
)
from kdzoo.datamodules.corruption_stream import stream_blocks

ALL = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform",
    "pixelate", "jpeg_compression",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def encoded(corruption: int, severity: int, n: int, side: int, chans: int) -> np.ndarray:
    """``n`` images whose first three pixels hold (corruption, severity, index)."""
    images = np.zeros((n, side, side, chans), np.uint8)
    images[:, 0, 0] = corruption
    images[:, 0, 1] = severity
    images[:, 0, 2, 0] = np.arange(n)
    return images


def write_set(
    root: Path, name: str, corruptions=("fog", "snow"), n=7, side=8, chans=1, labels=None
) -> Path:
    """A RobustBench-layout set: severity s of corruption c is the block encoded (c, s, i)."""
    folder = root / name
    folder.mkdir(parents=True)
    for c, corruption in enumerate(corruptions):
        stack = [encoded(c, s, n, side, chans) for s in range(1, 6)]
        np.save(folder / f"{corruption}.npy", np.concatenate(stack))
    if labels is None:  # different per severity, to check the slice's own labels are used
        labels = np.concatenate([(np.arange(n) + s) % 10 for s in range(1, 6)])
    np.save(folder / "labels.npy", labels)
    return folder


def codes(x: torch.Tensor, dm: CorruptionStream) -> np.ndarray:
    """(corruption, severity, index) of every image of a batch, from its first pixels."""
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    pixels = ((x * std + mean) * 255).round().to(torch.int64)
    return pixels[:, 0, 0, :3].numpy()


def run(dm: CorruptionStream) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    dm.setup("test")
    return list(dm.test_dataloader())


# -- the order of the stream ---------------------------------------------------------------------


def test_continual_stream(tmp_path):
    write_set(tmp_path, "Tiny-C")
    dm = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["fog", "snow"],
                          batch_size=3)  # fmt: skip
    assert dm.domains == ["fog-5", "snow-5"]
    batches = run(dm)
    # 7 images per block in batches of 3: 3 + 3 + 1, never mixing blocks.
    assert [len(y) for _, y, _ in batches] == [3, 3, 1] * 2
    for x, y, d in batches:
        assert x.dtype == torch.float32 and y.dtype == d.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(set(d.tolist())) == 1
    stream = np.concatenate([codes(x, dm) for x, _, _ in batches])
    expected = [(c, 5, i) for c in (0, 1) for i in range(7)]
    assert [tuple(r) for r in stream] == expected  # file order, severity-5 slice
    domains = torch.cat([d for _, _, d in batches]).tolist()
    assert domains == [0] * 7 + [1] * 7
    labels = torch.cat([y for _, y, _ in batches]).tolist()
    assert labels == [(i + 5) % 10 for i in range(7)] * 2  # the slice's own labels
    # The default corruptions are the 15 in benchmark order.
    assert CorruptionStream().domains == [f"{c}-5" for c in ALL]
    assert [b.severity for b in CorruptionStream(severity=2).blocks] == [2] * 15


def test_gradual_stream_runs_one_to_five_to_one_per_domain(tmp_path):
    write_set(tmp_path, "Tiny-C")
    dm = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["snow", "fog"],
                          setting="gradual", batch_size=7)  # fmt: skip
    levels = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert [(b.corruption, b.severity) for b in dm.blocks] == [
        (c, s) for c in ("snow", "fog") for s in levels
    ]
    assert dm.domains[:9] == [
        "snow-1", "snow-2", "snow-3", "snow-4", "snow-5",
        "snow-4#2", "snow-3#2", "snow-2#2", "snow-1#2",
    ]  # fmt: skip
    assert len(set(dm.domains)) == 18  # unique names: one per block
    batches = run(dm)
    assert len(batches) == 18
    for k, (x, _, d) in enumerate(batches):
        block = dm.blocks[k]
        assert set(d.tolist()) == {k}
        assert {tuple(r[:2]) for r in codes(x, dm)} == {({"fog": 0, "snow": 1}[block.corruption],
                                                         block.severity)}  # fmt: skip
    # A lower gradual peak: 1..3..1.
    assert [b.severity for b in stream_blocks(["fog"], "gradual", 3, 1)] == [1, 2, 3, 2, 1]


def test_repeats(tmp_path):
    write_set(tmp_path, "Tiny-C")
    dm = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["fog", "snow"],
                          repeats=3, batch_size=10)  # fmt: skip
    assert dm.domains == ["fog-5", "snow-5", "fog-5#2", "snow-5#2", "fog-5#3", "snow-5#3"]
    assert [b.occurrence for b in dm.blocks] == [1, 1, 2, 2, 3, 3]
    batches = run(dm)
    assert [int(d[0]) for _, _, d in batches] == list(range(6))
    for k, (x, _, _) in enumerate(batches):
        assert [tuple(r) for r in codes(x, dm)] == [(k % 2, 5, i) for i in range(7)]


def test_num_examples_takes_the_first_of_each_slice(tmp_path):
    write_set(tmp_path, "Tiny-C")
    dm = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["fog"],
                          setting="gradual", num_examples=4, batch_size=3)  # fmt: skip
    batches = run(dm)
    assert [len(y) for _, y, _ in batches] == [3, 1] * 9
    for s, k in zip([1, 2, 3, 4, 5, 4, 3, 2, 1], range(0, 18, 2), strict=True):
        rows = np.concatenate([codes(batches[k][0], dm), codes(batches[k + 1][0], dm)])
        assert [tuple(r) for r in rows] == [(0, s, i) for i in range(4)]
    big = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["fog"],
                           num_examples=100)  # fmt: skip
    assert sum(len(y) for _, y, _ in run(big)) == 7  # capped at the slice


def test_shuffle_seed_permutes_each_block_deterministically(tmp_path):
    write_set(tmp_path, "Tiny-C", n=40)

    def order(seed, **kwargs):
        dm = CorruptionStream(root=str(tmp_path), dataset="Tiny-C", corruptions=["fog", "snow"],
                              shuffle_seed=seed, batch_size=16, **kwargs)  # fmt: skip
        rows, labels = [], []
        for x, y, d in run(dm):
            assert len(set(d.tolist())) == 1
            rows.append(codes(x, dm))
            labels.append(y.numpy())
        return np.concatenate(rows), np.concatenate(labels)

    plain, plain_labels = order(None)
    assert plain[:, 2].tolist() == list(range(40)) * 2  # None: file order
    first, first_labels = order(1)
    np.testing.assert_array_equal(first, order(1)[0])  # same seed, same stream
    assert not np.array_equal(first, order(2)[0])
    for block in (first[:40], first[40:]):
        assert sorted(block[:, 2]) == list(range(40)) and block[:, 2].tolist() != list(range(40))
    assert first[:40, 2].tolist() != first[40:, 2].tolist()  # each block its own permutation
    assert first[:40, 0].tolist() == [0] * 40 and first[40:, 0].tolist() == [1] * 40
    # Labels travel with their images.
    np.testing.assert_array_equal(first_labels, (first[:, 2] + 5) % 10)
    np.testing.assert_array_equal(plain_labels, (plain[:, 2] + 5) % 10)


# -- what the model sees -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("FashionMNIST-C", (10, 1, 28, FashionMNIST.native_mean, FashionMNIST.native_std)),
        ("CIFAR-10-C", (10, 3, 32, CIFAR10.native_mean, CIFAR10.native_std)),
        ("CIFAR-100-C", (100, 3, 32, CIFAR100.native_mean, CIFAR100.native_std)),
        ("ImageNet-C", (1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ],
)
def test_properties_before_setup(dataset, expected):
    # No data at this root: the CLI links these before setup().
    dm = CorruptionStream(root="/nonexistent/kdzoo", dataset=dataset)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std) == expected
    assert FashionMNIST.native_mean == (0.2860,) and FashionMNIST.native_std == (0.3530,)


def test_normalisation_matches_the_clean_datamodule(tmp_path):
    write_set(tmp_path, "FashionMNIST-C", n=5, side=28)
    raw = np.load(tmp_path / "FashionMNIST-C" / "fog.npy")[20:25]  # severity 5
    dm = CorruptionStream(root=str(tmp_path), dataset="FashionMNIST-C", corruptions=["fog"])
    (x, _, _), = run(dm)  # fmt: skip
    expected = (raw.transpose(0, 3, 1, 2) / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(x, torch.tensor(expected, dtype=torch.float32))
    # Overridden; replicated to RGB and resized for an RGB source trained at 32 pixels.
    dm = CorruptionStream(root=str(tmp_path), dataset="FashionMNIST-C", corruptions=["fog"],
                          mean=(0.5,), std=(0.25,))  # fmt: skip
    (x, _, _), = run(dm)  # fmt: skip
    torch.testing.assert_close(x, torch.tensor((raw.transpose(0, 3, 1, 2) / 255 - 0.5) / 0.25,
                                               dtype=torch.float32))  # fmt: skip
    dm = CorruptionStream(root=str(tmp_path), dataset="FashionMNIST-C", corruptions=["fog"],
                          grey_to_rgb=True, image_size=32)  # fmt: skip
    assert (dm.in_chans, dm.mean, dm.image_size) == (3, (0.2860,) * 3, 32)
    (x, _, _), = run(dm)  # fmt: skip
    assert x.shape == (5, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_unknown_sets_read_their_properties_from_the_files(tmp_path):
    write_set(tmp_path, "Mine-C", side=12, chans=3, labels=np.arange(35) % 4)
    dm = CorruptionStream(root=str(tmp_path), dataset="Mine-C", corruptions=["snow"])
    # No normalisation by default, as RobustBench feeds [0, 1] images.
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std) == (
        4, 3, 12, (0.0,) * 3, (1.0,) * 3,
    )  # fmt: skip
    (x, _, _), = run(dm)  # fmt: skip
    assert x.shape == (7, 3, 12, 12) and float(x.max()) <= 1.0


def test_imagenet_c_folders(tmp_path):
    root = tmp_path / "ImageNet-C"
    wnids = ["n02", "n01", "n03"]  # class index = position in sorted order
    for c, corruption in enumerate(["fog", "snow"]):
        for s in (4, 5):
            for wnid in wnids:
                folder = root / corruption / str(s) / wnid
                folder.mkdir(parents=True)
                for i in range(2):
                    pixels = np.zeros((8, 8, 3), np.uint8)
                    pixels[0, 0, :3] = (c, s, i)
                    Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{wnid}{i}.png")
    kwargs = {"root": str(tmp_path), "corruptions": ["fog", "snow"], "batch_size": 4}
    with pytest.raises(DataError, match="1000 wnid folders"):
        run(CorruptionStream(dataset="ImageNet-C", image_size=8, **kwargs))
    (tmp_path / "ImageNet-C").rename(tmp_path / "TinyImageNet-C")
    dm = CorruptionStream(dataset="TinyImageNet-C", **kwargs)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 3, 8)
    batches = run(dm)
    assert [len(y) for _, y, _ in batches] == [4, 2, 4, 2]
    labels = torch.cat([y for _, y, _ in batches[:2]]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]  # n01, n01, n02, ...
    pixels = torch.cat([x for x, _, _ in batches]) * 255
    assert pixels[:6, :, 0, 0].round().tolist() == [[0, 5, 0], [0, 5, 1]] * 3
    assert pixels[6:, 0, 0, 0].round().tolist() == [1] * 6
    # num_examples: a fixed subset, the same images in every block.
    sub = CorruptionStream(dataset="TinyImageNet-C", num_examples=4, **kwargs)
    a, b = (torch.cat([y for _, y, d in run(sub) if int(d[0]) == k]) for k in (0, 1))
    assert len(a) == 4 and torch.equal(a, b)
    # Gradual needs every severity: the missing folders are named.
    with pytest.raises(DatasetNotFoundError, match=re.escape("fog/1")):
        CorruptionStream(dataset="TinyImageNet-C", setting="gradual", **kwargs).setup("test")


# -- errors --------------------------------------------------------------------------------------


def test_missing_data_says_where_and_how_to_make_it(tmp_path):
    dm = CorruptionStream(root=str(tmp_path / "nowhere"), dataset="FashionMNIST-C")
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("test")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "FashionMNIST-C") in message
    assert "labels.npy" in message and "gaussian_noise.npy" in message
    assert f"python tools/make_corruptions.py FashionMNIST --out {tmp_path / 'nowhere'}" in message
    # A partial set: the missing file is named.
    write_set(tmp_path, "FashionMNIST-C", corruptions=["fog"], side=28)
    dm = CorruptionStream(root=str(tmp_path), dataset="FashionMNIST-C", corruptions=["fog", "snow"])
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"Missing: {tmp_path}")) as info:
        dm.setup("test")
    assert str(tmp_path / "FashionMNIST-C" / "snow.npy") in str(info.value)
    assert "fog.npy," not in str(info.value).split("Missing:")[1]
    # CIFAR-10-C points at the official download; without root, $KDZOO_DATA is searched.
    with pytest.raises(DatasetNotFoundError, match="Zenodo record 2535967"):
        CorruptionStream(dataset="CIFAR-10-C").setup("test")


def test_wrong_shapes_are_clear_errors_at_setup(tmp_path):
    write_set(tmp_path, "FashionMNIST-C", side=28, chans=3)
    dm = CorruptionStream(root=str(tmp_path), dataset="FashionMNIST-C", corruptions=["fog"])
    with pytest.raises(DataError, match="should hold 1-channel images, the files hold 3"):
        dm.setup("test")
    write_set(tmp_path / "b", "FashionMNIST-C", side=32)
    dm = CorruptionStream(root=str(tmp_path / "b"), dataset="FashionMNIST-C", corruptions=["fog"])
    with pytest.raises(DataError, match=r"should be 28x28.*set data\.image_size"):
        dm.setup("test")
    folder = write_set(tmp_path / "c", "Mine-C")
    np.save(folder / "snow.npy", np.zeros((35, 9, 9, 1), np.uint8))
    dm = CorruptionStream(root=str(tmp_path / "c"), dataset="Mine-C", corruptions=["fog", "snow"])
    with pytest.raises(DataError, match="different shapes"):
        dm.setup("test")
    np.save(folder / "snow.npy", np.zeros((30, 8, 8, 1), np.uint8))
    with pytest.raises(DataError, match="30 images but 35 labels"):
        CorruptionStream(root=str(tmp_path / "c"), dataset="Mine-C", corruptions=["snow"]).setup()
    write_set(tmp_path / "d", "FashionMNIST-C", side=28, labels=np.arange(35) % 20)
    dm = CorruptionStream(root=str(tmp_path / "d"), dataset="FashionMNIST-C", corruptions=["fog"])
    with pytest.raises(DataError, match=r"out of range 0\.\.9 for FashionMNIST-C"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"severity": 6}, "severity must be 1..5"),
        ({"setting": "mixed"}, "setting must be 'continual' or 'gradual'"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_examples": 0}, "num_examples must be None or >= 1"),
        ({"corruptions": []}, "corruptions must be non-empty"),
        ({"dataset": "../x"}, "dataset must be a folder name"),
        ({"std": (0.2, 0.0, 0.2)}, "std values must be > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        CorruptionStream(**kwargs)
    with pytest.raises(DataError, match="must have in_chans=3 values"):
        CorruptionStream(mean=(0.5,)).mean  # noqa: B018


def test_no_training_loaders():
    dm = CorruptionStream(root="/nonexistent")
    with pytest.raises(DataError, match="test stream"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        dm.test_dataloader()


# -- through the kdzoo command -------------------------------------------------------------------

SOURCE = [
    "--model=kdzoo.methods.tta.Source",
    "--model.source.name=test_resnet",
    "--model.source.weights=random",
]


def test_cli_parses_and_links_the_stream_to_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kdzoo"])  # LightningCLI warns when given args and argv
    data = ["--data=CorruptionStream", "--data.dataset=FashionMNIST-C", f"--data.root={tmp_path}"]
    with pytest.raises(SystemExit) as info:
        KDCLI(args=["test", *SOURCE, *data, "--data.setting=gradual", "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: kdzoo.datamodules.CorruptionStream" in printed
    assert "setting: gradual" in printed
    # Instantiated: the model takes classes, channels and normalisation from the stream.
    cli = KDCLI(args=[*SOURCE, *data], run=False)
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_chans) == (10, 1)
    assert cli.model.mean == (0.2860,) and cli.model.std == (0.3530,)


def test_kdzoo_test_runs_the_stream(tmp_path, monkeypatch):
    write_set(tmp_path, "FashionMNIST-C", n=6, side=28)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["kdzoo"])
    KDCLI(
        args=[
            "test", *SOURCE, "--data=CorruptionStream", "--data.dataset=FashionMNIST-C",
            f"--data.root={tmp_path}", "--data.corruptions=[fog,snow]", "--data.batch_size=4",
            "--data.repeats=2", "--trainer.inference_mode=false",
            "--trainer.logger.init_args.name=s", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "runs/s/version_0/tta_domains.csv").open()))
    assert [r["name"] for r in rows] == ["fog-5", "snow-5", "fog-5#2", "snow-5#2"]
    stream = list(csv.DictReader((tmp_path / "runs/s/version_0/tta_stream.csv").open()))
    assert [int(r["images"]) for r in stream] == [4, 2] * 4
