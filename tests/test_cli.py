"""End-to-end tests through the real ``kdzoo`` command, in subprocesses, on scikit-learn digits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import DATA, QUIET, assert_clear_error, kdzoo, last_metrics

KD_STUDENT = ["--model=KD", "--model.student=test_efficientnet", "--model.teacher.name=test_resnet"]
# Each run is named from its method, student and teacher.
KD_RUN = "kd-test_efficientnet-test_resnet"

pytestmark = pytest.mark.slow


def test_help_lists_every_subcommand(tmp_path):
    out = kdzoo("--help", cwd=tmp_path).stdout
    for name in ("fit", "validate", "test", "predict", "bench"):
        assert f"  {name} " in out


def test_fit_then_test_kd(tmp_path, teacher_ckpt):
    kdzoo(
        "fit", *KD_STUDENT, f"--model.teacher.weights={teacher_ckpt}", *DATA, *QUIET,
        "--trainer.max_epochs=1", cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / f"runs/{KD_RUN}/version_0"
    assert (run / "config.yaml").is_file(), "the run config is saved next to the logs"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    out = kdzoo("test", "-c", str(run / "config.yaml"), f"--ckpt_path={best}", cwd=tmp_path)
    assert "test/top1" in out.stdout
    test_top1 = last_metrics(tmp_path / f"runs/{KD_RUN}/version_1")["test/top1"]
    assert 0.0 <= test_top1 <= 1.0
    kdzoo("predict", "-c", str(run / "config.yaml"), f"--ckpt_path={best}", cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / f"runs/{KD_RUN}/version_2/predictions.csv").open()))
    assert len(rows) == 200 and sorted(int(r["index"]) for r in rows) == list(range(200))
    probs = [float(rows[0][f"p{c}"]) for c in range(10)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert int(rows[0]["prediction"]) == max(range(10), key=probs.__getitem__)


def test_print_config_round_trip(tmp_path, teacher_ckpt):
    args = [*KD_STUDENT, f"--model.teacher.weights={teacher_ckpt}", *DATA, "--model.temperature=2"]
    first = kdzoo("fit", *args, "--print_config", cwd=tmp_path).stdout
    (tmp_path / "run.yaml").write_text(first)
    second = kdzoo("fit", "-c", "run.yaml", "--print_config", cwd=tmp_path).stdout
    assert first == second
    config = yaml.safe_load(first)
    assert config["model"]["class_path"] == "kdzoo.methods.KD"
    assert config["model"]["init_args"]["temperature"] == 2.0
    # The printed config runs as it is.
    kdzoo("fit", "-c", "run.yaml", *QUIET, "--trainer.max_steps=2", cwd=tmp_path)


def test_resume_from_last(tmp_path):
    common = ["--model=Supervised", "--model.student=test_resnet", *DATA, *QUIET]
    kdzoo("fit", *common, "--trainer.max_epochs=1", cwd=tmp_path)
    run = tmp_path / "runs/supervised-test_resnet/version_0"
    original_config = (run / "config.yaml").read_text()
    first = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    kdzoo("fit", *common, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path)
    assert not (run.parent / "version_1").exists(), "resumes into its run"
    assert (run / "config.yaml").read_text() == original_config, "never overwritten"
    assert (run / "config.1.yaml").is_file()
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    before = {r["epoch"] for r in csv.DictReader((run / "metrics.0.csv").open())}
    after = {r["epoch"] for r in csv.DictReader((run / "metrics.csv").open())}
    assert before == {"0"} and after == {"1"}, "both parts' logs are kept in the run directory"
    assert first["global_step"] == 8 and last["global_step"] == 2 * 8  # 400 images / 50 a batch


def test_resume_without_previous_run_is_a_clear_error(tmp_path):
    proc = kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *DATA, "--ckpt_path=last",
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert "no last*.ckpt under runs/supervised-test_resnet" in proc.stderr


def test_bf16_mixed_on_cpu(tmp_path, teacher_ckpt):
    kdzoo(
        "fit", *KD_STUDENT, f"--model.teacher.weights={teacher_ckpt}", *DATA, *QUIET,
        "--trainer.max_epochs=1", "--trainer.precision=bf16-mixed", cwd=tmp_path,
    )  # fmt: skip
    metrics = last_metrics(tmp_path / f"runs/{KD_RUN}/version_0")
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert 0.0 <= metrics["val/top1"] <= 1.0


def test_ddp_two_cpu_processes_sync_metrics(tmp_path, teacher_ckpt):
    kdzoo(
        "fit", *KD_STUDENT, f"--model.teacher.weights={teacher_ckpt}", *DATA, *QUIET,
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / f"runs/{KD_RUN}/version_0"
    ddp_top1 = last_metrics(run)["val/top1"]
    # The same checkpoint evaluated by one process over the whole validation split.
    kdzoo(
        "validate", "-c", str(run / "config.yaml"), "--trainer.devices=1",
        "--trainer.strategy=auto", f"--ckpt_path={run / 'checkpoints/last.ckpt'}", cwd=tmp_path,
    )  # fmt: skip
    single_top1 = last_metrics(run.parent / "version_1")["val/top1"]
    assert ddp_top1 == pytest.approx(single_top1, abs=1e-6)


def test_bench_quick_fast(tmp_path):
    from kdzoo import methods

    proc = kdzoo(
        "bench", "run", "quick", "--fast", "--out", str(tmp_path / "results"), cwd=tmp_path
    )
    # Long format: a row per logged test metric; the top-1 rows are one per run.
    all_rows = list(csv.DictReader((tmp_path / "results/quick_fast.csv").open()))
    # top-k is top-min(5, classes): the specialists of 3 and 4 classes log top3 / top4.
    assert {r["metric"] for r in all_rows} == {"top1", "top3", "top4", "top5", "loss"}
    rows = [r for r in all_rows if r["metric"] == "top1"]
    by_run = {r["run"]: r for r in rows}
    assert [r["run"] for r in rows][:3] == ["teacher", "baseline", "kd"]
    # Every classification method has a row (the "every method in the quick suite").
    run_methods = {r["method"] for r in rows}
    classification = {
        name
        for name in methods.__all__
        if issubclass(getattr(methods, name), methods.ClassificationModule)
    } - {"ClassificationModule", "DistillationModule"}
    assert classification <= run_methods, run_methods
    for row in rows:
        assert 0.0 <= float(row["value"]) <= 100.0
        assert row["dataset"] == "FashionMNIST" and row["seed"] == "0"
        assert Path(row["config"]).is_file()
        assert row["git_commit"]
    assert by_run["kd"]["teacher"] == by_run["teacher"]["student"]
    assert by_run["kc"]["teacher"] == " + ".join(["resnet18"] * 3)

    # `{best:RUN}` wiring: the MCMI teacher starts from the teacher run, KC reads the specialists.
    def run_config(name: str) -> dict:
        return yaml.safe_load(Path(by_run[name]["config"]).read_text())["model"]["init_args"]

    def best_of(name: str) -> str:
        return str(next(Path(by_run[name]["config"]).parent.glob("checkpoints/best-*.ckpt")))

    assert run_config("mcmi_teacher")["init_weights"] == best_of("teacher")
    assert run_config("kd_mcmi")["teacher"]["weights"] == best_of("mcmi_teacher")
    specialists = [s["weights"] for s in run_config("kc")["specialists"]]
    assert specialists == [best_of(f"spec_{v}") for v in ("tops", "footwear", "rest")]

    table = (tmp_path / "results/quick_fast.md").read_text()
    assert "| kd |" in table and "| KD |" in table and "vs kd" in table
    assert table.strip() in proc.stdout
    assert (tmp_path / "results/quick_fast.png").stat().st_size > 0


def test_bench_tta_quick_fast(tmp_path):
    """The TTA suite end to end: a source model from `fit`, then every TTA method through
    `kdzoo test` on a generated 200-image Fashion-MNIST-C."""
    from kdzoo.methods import tta

    kdzoo("bench", "run", "tta-quick", "--fast", "--out", str(tmp_path / "r"), cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / "r/tta-quick_fast.csv").open()))
    tta_rows = [r for r in rows if r["metric"] == "mean_error"]  # source_model logs top1
    assert {r["method"] for r in tta_rows} == set(tta.__all__) - {"TTAModule"}
    for row in tta_rows:
        assert 0.0 <= float(row["value"]) <= 100.0 and row["dataset"] == "CorruptionStream"
    assert {"error_fog-5", "error_snow-5"} <= {r["metric"] for r in rows if r["run"] == "tent"}
    assert (tmp_path / "r/data/FashionMNIST-C/fog.npy").is_file(), "the fast set is local"
    assert "mean error (%)" in (tmp_path / "r/tta-quick_fast.md").read_text()
    assert (tmp_path / "r/tta-quick_fast_stream.png").stat().st_size > 0


# ---- bad input: a clear message, no traceback ---------------------------------------------------
def test_missing_dataset_root(tmp_path):
    missing = tmp_path / "nowhere"
    proc = kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", "--data=FashionMNIST",
        f"--data.root={missing}", cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, str(missing), "apt-get install dataset-fashion-mnist")


def test_teacher_checkpoint_that_does_not_exist(tmp_path):
    proc = kdzoo(
        "fit", *KD_STUDENT, "--model.teacher.weights=missing/teacher.ckpt", *DATA,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "missing/teacher.ckpt", "not found")


def test_student_teacher_class_count_mismatch(tmp_path):
    import timm
    from safetensors.torch import save_file

    five_classes = timm.create_model("test_resnet", num_classes=5, in_chans=1)
    save_file(five_classes.state_dict(), tmp_path / "teacher5.safetensors")
    proc = kdzoo(
        "fit", *KD_STUDENT, "--model.teacher.weights=teacher5.safetensors", *DATA,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(
        proc, "teacher and student must predict the same classes", "teacher5.safetensors",
        "trained on 5 classes and the data has 10", "train the teacher on this data",
    )  # fmt: skip


def test_pld_teacher_with_another_class_vocabulary(tmp_path):
    """PLD ranks the student's classes by the teacher's logits: both must share the classes."""
    proc = kdzoo(
        "fit", "--model=PLD", "--model.student=test_efficientnet",
        "--model.teacher.name=test_resnet", "--model.teacher.num_classes=5", *DATA,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(
        proc, "kdzoo fit: error:", "PLD needs teacher and student to predict the same classes",
        "teacher.num_classes=5", "the data has 10",
    )  # fmt: skip


def test_unknown_config_key(tmp_path):
    (tmp_path / "typo.yaml").write_text(
        "model:\n  class_path: KD\n  init_args:\n    temprature: 3.0\n"
    )
    proc = kdzoo("fit", "-c", "typo.yaml", *DATA, cwd=tmp_path, expect_fail=True)
    assert "temprature" in proc.stderr
