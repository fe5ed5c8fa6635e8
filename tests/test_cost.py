"""The cost columns: parameters and MACs against hand counts, throughput, a suite's cost rows,
an active-learning part's cost rows (one per strategy), and the tables joining them."""

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
from kdzoo.cost import CostError, count_macs, count_parameters, measure, onnx_session, throughput
from kdzoo.cost_suite import active_strategies, measure_active, measure_suite, newest_round
from kdzoo.methods import DualHeadDistillation
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
        row = measure(network, [(4,)], warmup=0, reps=1)
    assert row["macs"] == 12 and row["eager_b1"] == "" and row["eager_b32"] > 0
    # The ONNX export is checked on batches of 2 and 3 instead of 2 and 1; onnxruntime is timed
    # where PyTorch runs (at batch 1 it would normalise one value to 0, not fail).
    assert row["ort_b1"] == "" and row["ort_b32"] > 0


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


# ---- an active-learning part ---------------------------------------------------------------

# A DHO round's hyper-parameters as hparams.yaml logs them (the teacher is not part of the
# deployed student, so it is left out).
DHO_HPARAMS = {"student": "test_resnet", "num_classes": 10, "in_chans": 1,
               "student_kwargs": None, "alpha": 0.5, "beta": 1.0}  # fmt: skip


def _round_dir(active: Path, strategy: str, seed: int, round_: int, hparams=DHO_HPARAMS) -> Path:
    """A round's log folder as the active-learning loop leaves it: ``config.yaml`` and
    ``hparams.yaml``, no checkpoint (rounds keep none)."""
    log_dir = active / strategy / f"seed{seed}" / f"round{round_}" / "version_0"
    log_dir.mkdir(parents=True)
    config = {"model": {"class_path": "kdzoo.methods.DualHeadDistillation"}, "data": DATA}
    (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (log_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return log_dir


def _active_results(root: Path) -> Path:
    """``<out>/mini_active`` with two strategies of two rounds each and their ``rounds.csv``."""
    active = root / "mini_active"
    lines = ["strategy,seed,round,n_labelled,test_top1,wall_clock_s"]
    for strategy in ("random", "entropy"):
        for round_ in (0, 1):
            _round_dir(active, strategy, 0, round_)
            lines.append(f"{strategy},0,{round_},{10 * (round_ + 1)},50.0,1.0")
    (active / "rounds.csv").write_text("\n".join(lines) + "\n")
    return active


def test_an_active_part_gets_one_cost_row_per_strategy_measured_once(tmp_path):
    active = _active_results(tmp_path)
    # An earlier round (round 0 of seed 1) of another network: the newest round is measured.
    _round_dir(active, "random", 1, 0, {**DHO_HPARAMS, "num_classes": 3})
    logged: list[str] = []
    cost = measure_active(active, warmup=0, reps=1, runtimes=("eager",), log=logged.append)
    assert [r["run"] for r in cost] == ["random", "entropy"]  # rounds.csv's order
    assert logged[0].endswith(", random)")  # random weights: no checkpoint
    assert logged[1] == "entropy: the network of an earlier run"
    student = DualHeadDistillation.deployable(DHO_HPARAMS).network.eval()
    for row in cost:
        assert set(row) == set(COST_FIELDS)
        assert row["student"] == "test_resnet" and row["input"] == "1x28x28"
        assert row["params"] == count_parameters(student)  # the backbone and both heads
        assert row["macs"] == count_macs(student, torch.zeros(1, 1, 28, 28))
        assert row["eager_b1"] > 0 and row["ort_b1"] == ""
    assert cost[0]["eager_b32"] == cost[1]["eager_b32"]


def test_the_newest_round_is_found_by_number_and_a_strategy_without_rounds_is_skipped(tmp_path):
    for round_ in (2, 10, 9):
        _round_dir(tmp_path, "s", 0, round_)
    (tmp_path / "s/seed0/round11/version_0").mkdir(parents=True)  # stopped before training
    assert newest_round(tmp_path / "s") == tmp_path / "s/seed0/round10/version_0"
    with pytest.raises(CostError, match=r"no rounds\.csv"):
        active_strategies(tmp_path)
    (tmp_path / "rounds.csv").write_text("strategy,seed,round\nbadge,0,0\n")
    logged: list[str] = []
    assert measure_active(tmp_path, runtimes=("eager",), log=logged.append) == []
    assert logged[0].startswith("badge: skipped,") and "seed*/round*/version_*" in logged[0]


@pytest.mark.slow
def test_the_tool_adds_one_row_per_strategy_of_the_active_part(tmp_path):
    log_dir = _run_dir(tmp_path, "teacher", checkpoint=False)
    row = {"run": "teacher", "metric": "top1", "value": 50.0, "config": str(log_dir / "x")}
    append_rows(tmp_path / "mini.csv", [row])
    active = _active_results(tmp_path)
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_cost.py"
    args = ["mini", "--out", str(tmp_path), "--cost_csv", str(tmp_path / "cost.csv")]
    args += ["--threads", "1", "--warmup", "0", "--reps", "1", "--runtimes", "eager"]
    run = [sys.executable, str(tool), *args]
    done = subprocess.run([*run, "--active", str(active)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = read_rows(tmp_path / "cost.csv", COST_FIELDS)
    assert [r["run"] for r in rows] == ["teacher", "random", "entropy"]
    assert rows[0]["params"] != rows[1]["params"]  # one head against DHO's two
    assert rows[1]["params"] == rows[2]["params"] and float(rows[1]["eager_b32"]) > 0
    assert rows[1]["eager_b32"] == rows[2]["eager_b32"]  # measured once
    # Without --active, <out>/mini_active is found, and refused when it is not an active part.
    (active / "rounds.csv").unlink()
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode != 0 and "no rounds.csv" in done.stderr
    assert len(read_rows(tmp_path / "cost.csv", COST_FIELDS)) == 3, "refused before measuring"


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


def _rounds() -> list[dict]:
    """Active-learning rounds as benchmarks/<suite>_active.csv holds them."""
    common = {"seed": "0", "git_commit": "abc"}
    return [
        {**common, "strategy": strategy, "n_labelled": n, "test_top1": top1, "wall_clock_s": t}
        for strategy, n, top1, t in (
            ("random", "10", "50.0", "8.0"), ("random", "20", "60.0", "9.0"),
            ("entropy", "10", "52.0", "8.0"), ("entropy", "20", "64.0", "10.0"),
        )
    ]  # fmt: skip


PIVOT = {"rows": "strategy", "columns": "n_labelled", "value": "test_top1", "header": "{} labels"}


def test_a_pivot_joins_the_cost_columns_it_declares_by_strategy(tmp_path):
    cost = {"run": "random", "params": 78_100, "eager_b1": 1520.4, "eager_b32": 8230.6}
    append_rows(tmp_path / "mini_cost.csv", [cost], COST_FIELDS)
    spec = {"pivot": PIVOT, "columns": ["params", "eager"]}
    table = render_spec(spec, _rounds(), cost=read_cost(tmp_path / "mini_cost.csv"))
    assert table.splitlines() == [
        "| strategy | 10 labels | 20 labels | params (M) | img/s b1 / b32 eager | seeds "
        "| time (s) | commit |",
        "|---|---|---|---|---|---|---|---|",
        "| random | 50.00 | 60.00 | 0.0781 | 1520 / 8231 | 0 | 17 | abc |",
        "| entropy | 52.00 | 64.00 | - | - | 0 | 18 | abc |",  # no cost row for entropy
    ]
    # Undeclared, the cost columns never appear.
    plain = render_spec({"pivot": PIVOT}, _rounds(), cost=read_cost(tmp_path / "mini_cost.csv"))
    assert "params" not in plain and "| random | 50.00 | 60.00 | 0 | 17 | abc |" in plain


def test_a_pivot_refuses_a_column_that_is_not_a_cost_column():
    spec = {"pivot": PIVOT, "columns": ["params", "seeds"]}
    with pytest.raises(ValueError, match=r"not \['seeds'\].*allowed: \['params', 'macs', 'eager'"):
        render_spec(spec, _rounds(), cost={})
