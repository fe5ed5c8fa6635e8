"""Segmentation end to end through the real ``kdzoo`` command on small generated mosaics: every
method, predictions, resume, DDP with two CPU processes, the seg-quick suite, and clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import QUIET, assert_clear_error, kdzoo, last_metrics
from PIL import Image

pytestmark = pytest.mark.slow

MOSAICS = [
    "--data=FashionMNISTMosaics",
    "--data.num_train=64",
    "--data.num_val=32",
    "--data.num_test=32",
    "--data.batch_size=16",
    "--data.eval_batch_size=16",
]
STUDENT = ["--model.student=test_resnet", "--model.head=fcn", "--checkpoint.monitor=val/miou",
           "--checkpoint.mode=max", "--trainer.max_epochs=1",
           "--trainer.log_every_n_steps=1"]  # fmt: skip


def _run_dir(cwd: Path, name: str | None = None, version: int = 0) -> Path:
    """``runs/<name>/version_N``; without a name, the test's only run (named by kdzoo from its
    method and student, e.g. ``fst-test_resnet``)."""
    if name is None:
        (run,) = (cwd / "runs").iterdir()
        name = run.name
    return cwd / "runs" / name / f"version_{version}"


def _best(run: Path) -> Path:
    (best,) = sorted((run / "checkpoints").glob("best-*.ckpt"))
    return best


def test_supervised_fit_test_predict(tmp_path):
    kdzoo("fit", "--model=SegSupervised", *STUDENT, *MOSAICS, *QUIET, cwd=tmp_path)
    run = _run_dir(tmp_path)
    metrics = last_metrics(run)
    assert 0.0 <= metrics["val/miou"] <= 1.0 and 0.0 <= metrics["val/pixel_acc"] <= 1.0
    config = str(run / "config.yaml")
    kdzoo("test", "-c", config, f"--ckpt_path={_best(run)}", cwd=tmp_path)
    assert 0.0 <= last_metrics(_run_dir(tmp_path, version=1))["test/miou"] <= 1.0
    kdzoo("predict", "-c", config, f"--ckpt_path={_best(run)}", cwd=tmp_path)
    masks = sorted((_run_dir(tmp_path, version=2) / "predictions").glob("*.png"))
    assert len(masks) == 32
    mask = np.array(Image.open(masks[0]))
    assert mask.shape == (64, 64) and mask.max() < 11


def test_lad_teacher_then_segkd_student(tmp_path):
    kdzoo(
        "fit", "--model=LADTeacher", *STUDENT, *MOSAICS, *QUIET,
        "--trainer.logger.init_args.name=lad", cwd=tmp_path,
    )  # fmt: skip
    lad = _run_dir(tmp_path, "lad")
    metrics = last_metrics(lad)
    assert {"val/miou", "val/miou_no_label", "train/loss_consistency"} <= set(metrics)
    kdzoo(
        "fit", "--model=SegKD", *STUDENT, *MOSAICS, *QUIET, f"--model.teacher.weights={_best(lad)}",
        "--trainer.logger.init_args.name=kd", cwd=tmp_path,
    )  # fmt: skip
    kd = _run_dir(tmp_path, "kd")
    assert "train/loss_kd" in last_metrics(kd)
    teacher = yaml.safe_load((kd / "config.yaml").read_text())["model"]["init_args"]["teacher"]
    assert teacher["weights"] == str(_best(lad))
    # The student checkpoint holds the student only, which is a plain 3-channel network.
    state = torch.load(_best(kd), weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    first_conv = next(v for k, v in state.items() if v.ndim == 4)
    assert first_conv.shape[1] == 3


def test_fst_wide_semi_supervised(tmp_path):
    kdzoo(
        "fit", "--model=FST", *STUDENT, *MOSAICS, *QUIET, "--model.mode=wide",
        "--model.k_steps=2", "--data.labelled=32", "--data.unlabelled=rest",
        "--data.future_batches=2", cwd=tmp_path,
    )  # fmt: skip
    run = _run_dir(tmp_path)
    assert {"train/loss_pseudo", "val/miou"} <= set(last_metrics(run))
    # Iterations counted once per real step: 2 = 32 unlabelled / 16 per batch.
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_fst_resume_continues_the_ema_warmup(tmp_path):
    args = ["fit", "--model=FST", *STUDENT, *MOSAICS, *QUIET, "--model.k_steps=1",
            "--data.unlabelled=target", "--data.eval_domain=target"]  # fmt: skip
    kdzoo(*args, cwd=tmp_path)
    first = torch.load(_run_dir(tmp_path) / "checkpoints/last.ckpt", weights_only=True)
    kdzoo(*args, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path)
    second = torch.load(_run_dir(tmp_path) / "checkpoints/last.ckpt", weights_only=True)
    updates = [c["state_dict"]["ema_updates"].item() for c in (first, second)]
    assert updates == [8, 16]  # 4 steps x (K + 1) EMA updates per epoch, carried over
    assert second["global_step"] == 8


def test_fst_ddp_two_cpu_processes(tmp_path):
    """FST's dict batches under DDP: each process gets its share of both loaders, and the
    synced validation mIoU equals one process evaluating the same checkpoint."""
    kdzoo(
        "fit", "--model=FST", *STUDENT, *MOSAICS, *QUIET, "--model.k_steps=1",
        "--data.labelled=32", "--data.unlabelled=rest", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.strategy=ddp", cwd=tmp_path,
    )  # fmt: skip
    run = _run_dir(tmp_path)
    ddp = last_metrics(run)
    # One step: 32 unlabelled canvases / (2 processes x 16).
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
    kdzoo(
        "validate", "-c", str(run / "config.yaml"), "--trainer.devices=1",
        "--trainer.strategy=auto", f"--ckpt_path={run / 'checkpoints/last.ckpt'}", cwd=tmp_path,
    )  # fmt: skip
    single = last_metrics(_run_dir(tmp_path, version=1))
    assert ddp["val/miou"] == pytest.approx(single["val/miou"], abs=1e-6)


def test_bench_seg_quick_fast(tmp_path):
    from kdzoo.methods import segmentation

    kdzoo("bench", "run", "seg-quick", "--fast", "--out", str(tmp_path / "r"), cwd=tmp_path)
    rows = [r for r in csv.DictReader((tmp_path / "r/seg-quick_fast.csv").open())
            if r["metric"] == "miou"]  # fmt: skip
    by_run = {r["run"]: r for r in rows}
    methods = set(segmentation.__all__) - {"SegmentationModule", "SegTeacherSpec", "encode_labels"}
    assert {r["method"] for r in rows} == methods
    for row in rows:
        assert 0.0 <= float(row["value"]) <= 100.0 and row["dataset"] == "FashionMNISTMosaics"
    assert by_run["segkd_lad"]["teacher"] == "test_resnet/deeplabv3+label"
    assert by_run["segkd_plain"]["teacher"] == "test_resnet/deeplabv3"
    assert by_run["lad_teacher_no_label"]["method"] == "LADTeacher"
    config = yaml.safe_load(Path(by_run["uda_fst"]["config"]).read_text())
    source_only = Path(by_run["uda_source_only"]["config"]).parent
    assert config["model"]["init_args"]["init_weights"] == str(_best(source_only))
    assert "mIoU (%)" in (tmp_path / "r/seg-quick_fast.md").read_text()


# ---- bad input: a clear message, no traceback ---------------------------------------------------
def test_fst_without_unlabelled_data_is_a_clear_error(tmp_path):
    proc = kdzoo("fit", "--model=FST", *STUDENT, *MOSAICS, *QUIET, cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "FST needs labelled and unlabelled data", "unlabelled")


def _tiny_voc(root: Path, mask_value: int, mask_size: tuple[int, int] = (24, 32)) -> None:
    voc = root / "VOCdevkit/VOC2012"
    for name in ("a", "b"):
        image = np.full((24, 32, 3), 128, np.uint8)
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(mask_size, mask_value, np.uint8)).save(
            voc / "SegmentationClass" / f"{name}.png"
        )
    (voc / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (voc / f"ImageSets/Segmentation/{split}.txt").write_text("a\nb\n")


@pytest.mark.parametrize(
    "mask_value,mask_size,fragments",
    [(30, (24, 32), ["30", "a.png"]), (1, (20, 32), ["20x32", "24x32", "a.png"])],
    ids=["class-ids", "mask-size"],
)
def test_bad_masks_are_clear_errors(tmp_path, mask_value, mask_size, fragments):
    _tiny_voc(tmp_path / "voc", mask_value, mask_size)
    proc = kdzoo(
        "fit", "--model=SegSupervised", *STUDENT, "--data=PascalVOC",
        f"--data.root={tmp_path / 'voc'}", "--data.crop_size=16", "--data.batch_size=2", *QUIET,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, *fragments)
