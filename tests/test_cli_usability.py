"""What a newcomer meets on the command line: help, typos, run names, resuming the right run,
evaluating without a checkpoint, and output that reads well in a log file (issue 12)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import yaml
from cli_helpers import DATA, QUIET, assert_clear_error, kdzoo

from kdzoo import datamodules, methods

SUPERVISED = ["--model=Supervised", "--model.student=test_resnet", *DATA, *QUIET]
RUN = "runs/supervised-test_resnet"

pytestmark = pytest.mark.slow


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_help_and_parse_errors_do_not_import_torch():
    """``kdzoo --help`` and a bad ``-c`` file answer before torch/Lightning load (7 CPU-s)."""
    code = (
        "import sys\n"
        "from kdzoo.cli import main\n"
        "main(['--help'])\n"
        "try:\n"
        "    main(['fit', '-c', 'no/such/config.yaml'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2\n"
        "heavy = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_epocs=2"], "unknown option --trainer.max_epocs; did you mean "
         "--trainer.max_epochs?"),
        (["--model.studnt=x"], "--model.studnt is not an option of Supervised; did you mean "
         "--model.student?"),
        (["--model=KDD"], "unknown --model KDD; did you mean KD? Valid: "),
        (["--data=FashonMNIST"], "unknown --data FashonMNIST; did you mean FashionMNIST?"),
    ],
)  # fmt: skip
def test_command_line_mistakes_end_with_the_problem(tmp_path, args, expected):
    proc = kdzoo("fit", *SUPERVISED, *args, cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, expected)
    assert expected in _last_line(proc)
    assert "usage:" not in proc.stderr and len(proc.stderr.splitlines()) <= 3


def test_unknown_method_lists_every_method(tmp_path):
    proc = kdzoo("fit", "--model=KDD", *DATA, cwd=tmp_path, expect_fail=True)
    for name in ("KD", "DKD", "Supervised", "SegKD", "RMT", "MSTDistill"):
        assert f" {name}," in _last_line(proc) or f" {name} " in _last_line(proc)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    (tmp_path / "good.yaml").write_text("trainer:\n  max_epochs: 1\n")
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_epochs: [1\nmodel: x\n")
    proc = kdzoo("fit", "-c", "good.yaml", "-c", "bad.yaml", cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "config file bad.yaml: YAML syntax error at line 3")
    assert "bad.yaml" in _last_line(proc)


def test_dataset_options_before_the_dataset_name_are_accepted(tmp_path):
    out = kdzoo(
        "fit", "--model.student=test_resnet", "--model=Supervised", "--data.train_subset=7",
        "--data=Digits", "--print_config", cwd=tmp_path,
    ).stdout  # fmt: skip
    config = yaml.safe_load(out)
    assert config["data"]["init_args"]["train_subset"] == 7
    assert config["model"]["init_args"]["student"] == "test_resnet"


def test_list_prints_every_method_and_dataset_with_its_paper(tmp_path):
    out = kdzoo("list", cwd=tmp_path).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name in ("KD", "DKD", "ND", "PLD", "TGeoKD", "RMT", "FST", "MSTDistill", "ImageFolder"):
        assert name in lines, name
    assert "arXiv:1503.02531" in lines["KD"]
    assert "arXiv:2305.17007" in lines["ND"]
    assert set(lines) <= set(methods.__all__) | set(datamodules.__all__)


def test_fit_help_leads_with_what_to_do(tmp_path):
    out = kdzoo("fit", "--help", cwd=tmp_path).stdout
    head = "\n".join(out.splitlines()[:12])
    assert "--model NAME" in head and "kdzoo list" in head and "--ckpt_path last" in head
    subcommands = kdzoo("hub", "--help", cwd=tmp_path).stdout
    assert "Export the deployable network of a kdzoo checkpoint" in subcommands


def test_runs_are_named_and_log_lines_reach_a_file(tmp_path):
    """A run is named from method and student; piped output gets one line per epoch; the
    hparams file is plain YAML; --trainer.default_root_dir moves runs/."""
    proc = kdzoo("fit", *SUPERVISED, "--trainer.max_epochs=2", cwd=tmp_path)
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout and "val/top1=" in proc.stdout
    run = tmp_path / RUN / "version_0"
    assert (run / "checkpoints/last.ckpt").is_file()
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())  # no !!python/tuple tags
    assert hparams["mean"] == [pytest.approx(0.3053)] and hparams["student"] == "test_resnet"
    kdzoo(
        "fit", *SUPERVISED, "--trainer.max_steps=1", "--trainer.default_root_dir=elsewhere",
        cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "elsewhere" / RUN / "version_0/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / RUN / "version_1").exists()


def test_evaluating_without_a_checkpoint_is_an_error_unless_asked(tmp_path):
    proc = kdzoo("test", *SUPERVISED, cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "no --ckpt_path", "untrained Supervised", "--untrained true")
    out = kdzoo("test", *SUPERVISED, "--untrained=true", cwd=tmp_path).stdout
    assert "test/top1" in out


def test_last_means_this_configs_run_and_other_checkpoints_are_refused(tmp_path):
    kdzoo("fit", *SUPERVISED, "--trainer.max_epochs=1", cwd=tmp_path)
    # A newer run of another config in the same runs/ must not be what `last` resumes.
    other = ["--model=Supervised", "--model.student=test_efficientnet", *DATA, *QUIET]
    kdzoo("fit", *other, "--trainer.max_epochs=1", cwd=tmp_path)
    other_run = tmp_path / "runs/supervised-test_efficientnet/version_0"
    other_files = sorted(p.name for p in other_run.iterdir())

    proc = kdzoo(
        "fit", *SUPERVISED, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path,
        env={"PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert f"{RUN}/version_0/checkpoints/last.ckpt" in proc.stderr
    assert "will be deleted" not in proc.stderr, "kdzoo kept them; Lightning must not say so"
    last = torch.load(tmp_path / RUN / "version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 8  # resumed its own 1-epoch run: 400 images / 50 a batch

    # A checkpoint of another config: refused with the difference named, nothing touched.
    other_ckpt = other_run / "checkpoints/last.ckpt"
    proc = kdzoo(
        "fit", *SUPERVISED, "--data.train_subset=300", "--trainer.max_epochs=2",
        f"--ckpt_path={other_ckpt}", cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(
        proc, "not a checkpoint of this config", "model.student: checkpoint 'test_efficientnet'"
    )
    assert sorted(p.name for p in other_run.iterdir()) == other_files

    # Resuming with other data is refused too; evaluating on other data is not.
    proc = kdzoo(
        "fit", *SUPERVISED, "--data.train_subset=300", "--trainer.max_epochs=3",
        "--ckpt_path=last", cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "data.train_subset: checkpoint 400, config 300")
    proc = kdzoo("test", *SUPERVISED, f"--ckpt_path={other_ckpt}", cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "refusing to test it", "test_efficientnet")
    out = kdzoo("test", *SUPERVISED, "--data.eval_subset=100", "--ckpt_path=best", cwd=tmp_path)
    assert "test/top1" in out.stdout


def test_test_of_a_saved_config_uses_its_own_run(tmp_path):
    kdzoo("fit", *SUPERVISED, "--trainer.max_epochs=1", cwd=tmp_path)
    config = tmp_path / RUN / "version_0/config.yaml"
    kdzoo("test", "-c", str(config), "--ckpt_path=last", cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / RUN / "version_1/metrics.csv").open()))
    assert rows and "test/top1" in rows[-1]
