"""The cost columns: parameters and MACs against hand counts, throughput, a suite's cost rows,
and the result table joining them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

import kdzoo.models  # noqa: F401  (registers test_resnet)
from kdzoo.cost import (
    count_macs,
    count_parameters,
    measure,
    measure_suite,
    onnx_session,
    throughput,
)
from kdzoo.results import (
    COST_FIELDS,
    append_rows,
    read_cost,
    read_rows,
    render_spec,
    render_table,
)


def test_a_linear_layer_by_hand():
    layer = nn.Linear(7, 5)
    assert count_parameters(layer) == 7 * 5 + 5  # weight + bias
    assert count_macs(layer, torch.zeros(1, 7)) == 7 * 5  # one MAC per weight per sample
    assert count_macs(layer, torch.zeros(4, 7)) == 4 * 7 * 5


def test_a_conv_layer_by_hand():
    conv = nn.Conv2d(3, 4, 3)
    assert count_parameters(conv) == 4 * 3 * 3 * 3 + 4
    # 8x8 input, 3x3 kernel, no padding: a 6x6 map per output channel; each output value is
    # 3 input channels x 3 x 3 MACs (the bias addition is not a MAC).
    per_image = 6 * 6 * 4 * (3 * 3 * 3)
    assert count_macs(conv, torch.zeros(1, 3, 8, 8)) == per_image == 3888
    assert count_macs(conv, torch.zeros(2, 3, 8, 8)) == 2 * per_image


def test_shared_parameters_count_once_and_buffers_not_at_all():
    layer = nn.Linear(3, 3, bias=False)
    model = nn.Sequential(layer, nn.BatchNorm1d(3), layer)
    assert count_parameters(model) == 9 + 2 * 3  # the shared weight once, BN's weight and bias


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


@pytest.mark.parametrize("batch", [1, 32])
def test_eager_throughput_is_a_positive_number(batch):
    value = throughput(_tiny(), (1, 8, 8), batch, warmup=0, reps=1)
    assert math.isfinite(value) and value > 0


def test_onnxruntime_throughput_is_a_positive_number():
    # Plain imports, not importorskip: onnxruntime and onnxscript are in the dev extra, so CI must
    # run this test rather than skip it.
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401

    session = onnx_session(_tiny().eval(), [(1, 8, 8)])
    for batch in (1, 32):  # one export with a dynamic batch axis serves both
        value = throughput(session, (1, 8, 8), batch, warmup=0, reps=1)
        assert math.isfinite(value) and value > 0


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_measure_gives_every_column_for_a_network_with_two_inputs():
    row = measure(_TwoInputs(), [(3,), (5,)], warmup=0, reps=1, runtimes=("eager",))
    assert row["params"] == 3 * 2 + 2 + 5 * 2 + 2
    assert row["macs"] == 3 * 2 + 5 * 2  # per sample
    assert row["eager_b1"] > 0 and row["eager_b32"] > 0
    assert row["ort_b1"] == row["ort_b32"] == ""  # not asked for


def test_a_network_on_batch_statistics_has_no_batch_1_column():
    # Test-time adaptation's BatchNorm without running statistics cannot take one sample.
    network = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match="batch 1"):
        row = measure(network, [(4,)], warmup=0, reps=1, runtimes=("eager",))
    assert row["macs"] == 12 and row["eager_b1"] == "" and row["eager_b32"] > 0


# ---- a suite --------------------------------------------------------------------------------

HPARAMS = {"student": "test_resnet", "num_classes": 10, "in_chans": 1, "student_kwargs": None}
DATA = {"class_path": "kdzoo.datamodules.FashionMNIST", "init_args": {"image_size": None}}


def _run_dir(root: Path, run: str, checkpoint: bool) -> Path:
    """A run's log folder as ``kdzoo bench`` leaves it: a best checkpoint after training, or
    only ``config.yaml`` and ``hparams.yaml`` after a test-only run."""
    log_dir = root / "runs" / "mini" / run / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "config.yaml").write_text(
        yaml.safe_dump({"model": {"class_path": "kdzoo.methods.Supervised"}, "data": DATA})
    )
    (log_dir / "hparams.yaml").write_text(yaml.safe_dump(HPARAMS))
    if checkpoint:
        student = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        state = {f"student.model.{k}": v for k, v in student.state_dict().items()}
        (log_dir / "checkpoints").mkdir()
        torch.save(
            {
                "state_dict": state,
                "hyper_parameters": {**HPARAMS, "_class_path": "kdzoo.methods.Supervised"},
                "datamodule_hyper_parameters": {
                    "_class_path": DATA["class_path"],
                    **DATA["init_args"],
                },
            },
            log_dir / "checkpoints" / "best-epoch0.ckpt",
        )
    return log_dir


def test_a_suite_gets_one_cost_row_per_run_measured_once_per_network(tmp_path):
    trained = _run_dir(tmp_path, "trained", checkpoint=True)
    _run_dir(tmp_path, "tested", checkpoint=False)
    rows = [
        {"run": run, "student": "test_resnet", "metric": "top1", "value": 50.0, "seed": 0,
         "config": config}
        for run, config in (
            ("trained", str(trained / "config.yaml")),
            ("tested", "/results/moved/elsewhere/config.yaml"),  # found under runs/ instead
        )
    ]  # fmt: skip
    append_rows(tmp_path / "mini.csv", rows)
    logged: list[str] = []
    runs = tmp_path / "runs" / "mini"
    cost = measure_suite(
        tmp_path / "mini.csv", runs, warmup=0, reps=1, runtimes=("eager",), log=logged.append
    )
    assert [r["run"] for r in cost] == ["trained", "tested"]
    assert "tested: the network of an earlier run" in logged
    assert "best-epoch0.ckpt)" in logged[0]  # the trained run's weights loaded, strictly
    student = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    for row in cost:
        assert set(row) == set(COST_FIELDS)
        assert row["input"] == "1x28x28"  # Fashion-MNIST's native size, 1 channel
        assert row["params"] == count_parameters(student)
        assert row["macs"] == count_macs(student, torch.zeros(1, 1, 28, 28))
        assert row["eager_b1"] > 0 and row["ort_b1"] == ""
    append_rows(tmp_path / "mini_cost.csv", cost, COST_FIELDS)
    assert set(read_cost(tmp_path / "mini_cost.csv")) == {"trained", "tested"}


@pytest.mark.slow
def test_the_tool_appends_the_rows_of_a_finished_suite(tmp_path):
    log_dir = _run_dir(tmp_path, "baseline", checkpoint=True)
    row = {"run": "baseline", "metric": "top1", "value": 50.0, "config": str(log_dir / "x")}
    append_rows(tmp_path / "mini.csv", [row])
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_cost.py"
    args = ["mini", "--out", str(tmp_path), "--cost_csv", str(tmp_path / "cost.csv")]
    args += ["--threads", "1", "--warmup", "0", "--reps", "1", "--runtimes", "eager"]
    done = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (row,) = read_rows(tmp_path / "cost.csv", COST_FIELDS)
    assert row["run"] == "baseline" and row["input"] == "1x28x28" and row["threads"] == "1"
    assert float(row["eager_b32"]) > 0 and row["ort_b32"] == ""


# ---- the table ------------------------------------------------------------------------------


def _results(tmp_path: Path) -> list[dict]:
    common = {"method": "KD", "student": "s", "teacher": "", "dataset": "D", "metric": "top1",
              "seed": 0, "epochs": 1, "wall_clock_s": 10.0, "git_commit": "abc"}  # fmt: skip
    rows = [{**common, "run": "a", "value": 70.0}, {**common, "run": "b", "value": 71.0}]
    append_rows(tmp_path / "mini.csv", rows)
    return read_rows(tmp_path / "mini.csv")


def test_the_table_joins_the_cost_columns_it_declares(tmp_path):
    old = {"run": "a", "params": 1, "macs": 1}
    new = {"run": "a", "params": 78_100, "macs": 11_240_000, "eager_b1": 1520.4,
           "eager_b32": 8230.6, "ort_b1": 3000.0, "ort_b32": ""}  # fmt: skip
    append_rows(tmp_path / "mini_cost.csv", [old, new], COST_FIELDS)
    spec = {"columns": ["run", "value", "params", "macs", "eager", "ort"]}
    table = render_spec(spec, _results(tmp_path), cost=read_cost(tmp_path / "mini_cost.csv"))
    lines = table.splitlines()
    assert lines[0] == (
        "| run | top1 (%) | params (M) | MACs (M) | img/s b1 / b32 eager | img/s b1 / b32 ORT |"
    )
    assert lines[2] == "| a | 70.00 | 0.0781 | 11.2 | 1520 / 8231 | 3000 / - |"  # newest row
    assert lines[3] == "| b | 71.00 | - | - | - | - |"  # no cost row for b


def test_without_a_cost_file_the_cost_columns_are_empty(tmp_path):
    assert read_cost(tmp_path / "missing_cost.csv") == {}
    spec = {"columns": ["run", "value", "params", "eager"]}
    table = render_spec(spec, _results(tmp_path), cost=read_cost(tmp_path / "missing_cost.csv"))
    assert table.splitlines()[2] == "| a | 70.00 | - | - |"
    # Undeclared, the cost columns never appear.
    assert render_table(_results(tmp_path), cost={"a": {"params": "5"}}) == render_table(
        _results(tmp_path)
    )
