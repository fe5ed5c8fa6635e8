"""A user's own image folder, end to end: fit, distil, test and predict through the real ``kdzoo``
command, and one-line errors for the folders and files users get wrong (issue 12).

The data is generated here: three classes of tiny random-colour PNG and JPEG images.
"""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import QUIET, assert_clear_error, kdzoo, last_metrics
from PIL import Image

from kdzoo.callbacks import PredictionWriter
from kdzoo.datamodules import DataError, ImageFolder
from kdzoo.datamodules.paired import FeaturePairs

CLASSES = ("ant", "bee", "cat")


def write_images(directory: Path, n: int, rng: np.random.Generator, size=(16, 16)) -> list[Path]:
    """``n`` images of one random colour plus noise, PNG and JPEG alternately."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        noise = rng.integers(-20, 21, (*size, 3))
        pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
        path = directory / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_user_folder(root: Path, n: int = 12) -> Path:
    """``root/train/<class>/*`` and ``root/val/<class>/*``, ``n`` images each."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in CLASSES:
            write_images(root / split / name, n, rng)
    return root


def truncate(path: Path) -> None:
    """Keep the header but cut the pixel data: PIL opens the file and fails only to decode it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DATA = ["--data=ImageFolder", "--data.image_size=16", "--data.batch_size=8"]
SHORT = ["--trainer.max_epochs=1", *QUIET]


def data_args(root: Path) -> list[str]:
    return [*DATA, f"--data.root={root}"]


def assert_one_error_line(proc, fragment: str) -> None:
    """The failure is reported on one ``error:`` line, which names ``fragment``."""
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def logged_hparams(run: Path) -> dict:
    """The run's logged ``hparams.yaml``, tuples as lists (whether or not the logger tagged them
    ``!!python/tuple``)."""
    logged = yaml.load((run / "hparams.yaml").read_text(), Loader=yaml.FullLoader)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in logged.items()}


def only(directory: Path, pattern: str) -> Path:
    """The one file matching ``pattern`` under ``directory`` (each command runs in its own
    directory, so this does not depend on how runs are named)."""
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


# -- end to end through the CLI -------------------------------------------------------------------


@pytest.mark.slow
def test_fit_distil_test_and_predict_a_user_folder(tmp_path):
    root = write_user_folder(tmp_path / "imgs")
    steps = {name: tmp_path / name for name in ("teacher", "kd", "test", "predict")}
    for directory in steps.values():
        directory.mkdir()
    kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *data_args(root), *SHORT,
        cwd=steps["teacher"],
    )  # fmt: skip
    teacher = only(steps["teacher"], "runs/**/best-*.ckpt")
    kdzoo(
        "fit", "--model=KD", "--model.student=test_resnet", "--model.teacher.name=test_resnet",
        f"--model.teacher.weights={teacher}", *data_args(root), *SHORT, cwd=steps["kd"],
    )  # fmt: skip
    run = only(steps["kd"], "runs/**/config.yaml").parent
    # The logged hyper-parameters hold what the model received, not the arguments' None.
    logged = logged_hparams(run)
    assert logged["mean"] == pytest.approx([0.485, 0.456, 0.406])
    best = only(run, "checkpoints/best-*.ckpt")

    config = str(run / "config.yaml")
    out = kdzoo("test", "-c", config, f"--ckpt_path={best}", cwd=steps["test"])
    assert "test/top1" in out.stdout
    test_top1 = last_metrics(only(steps["test"], "runs/**/metrics.csv").parent)["test/top1"]
    assert 0.0 <= test_top1 <= 1.0

    # A folder of unlabelled images of any size, nested, with a stray non-image file.
    pics = tmp_path / "pics"
    rng = np.random.default_rng(1)
    images = write_images(pics, 3, rng, size=(20, 28)) + write_images(pics / "more", 2, rng)
    (pics / "readme.txt").write_text("not an image")
    kdzoo(
        "predict", "-c", config, f"--ckpt_path={best}", f"--data.predict_dir={pics}",
        cwd=steps["predict"],
    )  # fmt: skip
    with only(steps["predict"], "runs/**/predictions.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["index", "file", "prediction", "class_name", "p0", "p1", "p2"]
        rows = list(reader)
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in images)
    assert sorted(int(r["index"]) for r in rows) == list(range(5))
    for row in rows:
        probs = [float(row[f"p{c}"]) for c in range(3)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert int(row["prediction"]) == max(range(3), key=probs.__getitem__)
        assert row["class_name"] == CLASSES[int(row["prediction"])]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, mean",
    [
        (["--data.mean=[0.5,0.5,0.5]", "--data.std=[0.25,0.25,0.25]"], [0.5, 0.5, 0.5]),
        (["--data.in_chans=1", "--data.grey_to_rgb=true", "--data.mean=[0.4]", "--data.std=[0.2]"],
         [0.4, 0.4, 0.4]),
    ],
    ids=["rgb-explicit-mean-std", "grey-to-rgb"],
)  # fmt: skip
def test_fit_with_normalisation_and_channel_options(tmp_path, extra, mean):
    """Explicit mean/std, and grey images replicated to RGB (plain greyscale with the default
    mean/std: the skip_broken_images test below)."""
    root = write_user_folder(tmp_path / "imgs", n=6)
    kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *data_args(root), *extra,
        *SHORT, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", cwd=tmp_path,
    )  # fmt: skip
    logged = logged_hparams(only(tmp_path, "runs/**/hparams.yaml").parent)
    assert logged["mean"] == pytest.approx(mean)
    assert logged["in_chans"] == len(mean)


@pytest.mark.slow
def test_empty_class_folder_is_a_one_line_error(tmp_path):
    root = write_user_folder(tmp_path / "imgs", n=4)
    (root / "train" / "dog").mkdir()
    (root / "val" / "dog").mkdir()
    proc = kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *data_args(root), *SHORT,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "kdzoo fit: error:", str(root / "train" / "dog"), "remove")
    assert_one_error_line(proc, str(root / "train" / "dog"))


@pytest.mark.slow
def test_truncated_image_is_a_one_line_error_naming_the_file(tmp_path):
    root = write_user_folder(tmp_path / "imgs", n=4)
    broken = root / "train" / "bee" / "img1.png"
    truncate(broken)
    proc = kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *data_args(root), *SHORT,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "kdzoo fit: error:", str(broken), "--data.skip_broken_images true")
    assert_one_error_line(proc, str(broken))


@pytest.mark.slow
def test_skip_broken_images_trains_and_reports_what_it_skipped(tmp_path):
    root = write_user_folder(tmp_path / "imgs", n=4)
    truncate(root / "train" / "bee" / "img1.png")
    (root / "val" / "cat" / "img2.jpg").write_text("not a jpeg")
    proc = kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *data_args(root), *SHORT,
        "--data.skip_broken_images=true", "--data.in_chans=1", cwd=tmp_path,
    )  # fmt: skip
    message = proc.stdout + proc.stderr
    assert "skipped 2 unreadable images" in message
    assert str(root / "train" / "bee" / "img1.png") in message
    assert str(root / "val" / "cat" / "img2.jpg") in message
    logged = logged_hparams(only(tmp_path, "runs/**/hparams.yaml").parent)
    assert (logged["in_chans"], logged["mean"], logged["std"]) == (1, [0.449], [0.226])


# -- the datamodule and the prediction writer, without the CLI ---------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folder_without_images_is_an_error(tmp_path, split):
    root = write_user_folder(tmp_path / "imgs", n=2)
    folder = root / split / "bee"
    for path in folder.iterdir():
        path.unlink()
    (folder / "notes.txt").write_text("no image extension: the folder counts as empty")
    dm = ImageFolder(root=str(root), image_size=8)
    with pytest.raises(DataError, match="remove the folder or add images") as info:
        dm.setup("fit")
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_unidentified_image_is_an_error_naming_the_file(tmp_path):
    root = write_user_folder(tmp_path / "imgs", n=2)
    bad = root / "val" / "ant" / "img0.jpg"
    bad.write_bytes(b"\x00" * 64)
    dm = ImageFolder(root=str(root), image_size=8)
    dm.setup("test")
    index = [str(p) for p in dm.test.paths].index(str(bad))
    with pytest.raises(DataError, match="skip_broken_images") as info:
        dm.test[index]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_skip_broken_images_drops_them_from_the_splits(tmp_path, capsys):
    root = write_user_folder(tmp_path / "imgs", n=4)
    broken = [root / "train" / "ant" / "img0.jpg", root / "val" / "bee" / "img3.png"]
    for path in broken:
        truncate(path)
    dm = ImageFolder(root=str(root), image_size=8, val_fraction=0.25, skip_broken_images=True)
    dm.setup("fit")
    assert len(dm.train) + len(dm.val) == 11 and len(dm.test) == 11
    assert not set(broken) & {p for ds in (dm.train, dm.val, dm.test) for p in ds.paths}
    assert all(ds[i][0].shape == (3, 8, 8) for ds in (dm.train, dm.test) for i in range(len(ds)))
    assert "skipped 2 unreadable images" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["test", "val", "train"])
def test_predict_split(tmp_path, split):
    root = write_user_folder(tmp_path / "imgs", n=4)
    dm = ImageFolder(root=str(root), image_size=8, val_fraction=0.25, predict_split=split)
    dm.setup("predict")
    source = getattr(dm, split)
    assert dm.predict.paths == source.paths
    assert dm.predict.targets.tolist() == source.targets.tolist()
    # Predictions always see the eval transforms: reading an item twice gives the same tensor.
    assert torch.equal(dm.predict[0][0], dm.predict[0][0])


def test_predict_dir_without_images_is_an_error(tmp_path):
    root = write_user_folder(tmp_path / "imgs", n=2)
    (tmp_path / "pics").mkdir()
    dm = ImageFolder(root=str(root), image_size=8, predict_dir=str(tmp_path / "pics"))
    with pytest.raises(DataError, match=str(tmp_path / "pics")):
        dm.setup("predict")


def test_logged_hyperparameters_are_the_resolved_linked_values(tmp_path):
    dm = ImageFolder(root="/x", in_chans=1, grey_to_rgb=True)
    logged = dm.hparams_initial
    assert (logged["in_chans"], logged["mean"], logged["std"]) == (3, dm.mean, dm.std)
    # The arguments as given stay in hparams, so a checkpointed datamodule is rebuilt as it was.
    assert (dm.hparams["in_chans"], dm.hparams["mean"]) == (1, None)
    # Paired data: num_classes=None means "from the files".
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        np.save(tmp_path / f"{split}_m1.npy", np.zeros((n, 4)))
        np.save(tmp_path / f"{split}_m2.npy", np.zeros((n, 2)))
        np.save(tmp_path / f"{split}_labels.npy", np.arange(n) % 3)
    pairs = FeaturePairs(root=str(tmp_path))
    assert pairs.hparams_initial["num_classes"] == 3 and pairs.hparams["num_classes"] is None


class _Trainer:
    """What PredictionWriter reads of a trainer."""

    def __init__(self, log_dir: Path, dataset, class_names=None, world_size=1, rank=0) -> None:
        self.log_dir, self.world_size, self.global_rank = str(log_dir), world_size, rank
        self.predict_dataloaders = torch.utils.data.DataLoader(dataset)
        self.datamodule = type("DM", (), {"class_names": class_names})()


def test_prediction_writer_columns_and_no_overwrite(tmp_path, capsys):
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    predictions = [{"probs": probs[:2]}, {"probs": probs[2:]}]
    writer = PredictionWriter()

    class Files(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.paths = [Path("a.png"), Path("b.png"), Path("c.png")]

        def __len__(self) -> int:
            return 3

    trainer = _Trainer(tmp_path, Files(), class_names=["no", "yes"])
    writer.write_on_epoch_end(trainer, None, predictions, [[[2, 0], [1]]])
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [(r["index"], r["file"], r["prediction"], r["class_name"]) for r in rows] == [
        ("2", "c.png", "0", "no"),
        ("0", "a.png", "1", "yes"),
        ("1", "b.png", "0", "no"),
    ]
    # No file names or class names to give: empty columns. The first file is kept.
    trainer = _Trainer(tmp_path, torch.utils.data.TensorDataset(probs), world_size=2, rank=1)
    writer.write_on_epoch_end(trainer, None, predictions, [[[0, 1], [2]]])
    rows = list(csv.DictReader((tmp_path / "predictions.rank1.csv").open()))
    assert [(r["file"], r["class_name"]) for r in rows] == [("", "")] * 3
    writer.write_on_epoch_end(_Trainer(tmp_path, Files()), None, predictions, [[[0, 1], [2]]])
    assert (tmp_path / "predictions.csv").read_text().count("c.png") == 1
    assert (tmp_path / "predictions.1.csv").is_file()


@pytest.mark.parametrize("split", ["val", "train"])
def test_every_classification_datamodule_predicts_any_split(split):
    """``predict_split`` is an argument of the shared base (Digits re-lists it; Fashion-MNIST,
    CIFAR inherit it), and ``train`` is predicted without its augmentations."""
    from kdzoo.datamodules import CIFAR10, Digits, FashionMNIST

    for cls in (FashionMNIST, CIFAR10):
        assert "predict_split" in inspect.signature(cls).parameters, cls
    dm = Digits(predict_split=split, train_subset=40, eval_subset=20)
    dm.setup("predict")
    source = getattr(dm, split)
    assert dm.predict.indices.tolist() == source.indices.tolist()
    assert dm.predict.targets.tolist() == source.targets.tolist()
    first = [dm.predict[0][0] for _ in range(2)]
    assert torch.equal(*first), "predictions use the eval transforms"
