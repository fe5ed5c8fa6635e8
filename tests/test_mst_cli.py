"""Cross-modal distillation end to end through the real ``kdzoo`` command: the mst-quick suite in
its fast preset (teachers, no-KD and KD students, MST-Distill's three stages chained through their
checkpoints), and a stage given the wrong stage's checkpoint as a one-line error."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from cli_helpers import QUIET, assert_clear_error, kdzoo

pytestmark = pytest.mark.slow


def test_bench_mst_quick_fast_then_a_wrong_stage_chain(tmp_path):
    from kdzoo.methods import crossmodal

    kdzoo("bench", "run", "mst-quick", "--fast", "--out", str(tmp_path / "r"), cwd=tmp_path)
    rows = [r for r in csv.DictReader((tmp_path / "r/mst-quick_fast.csv").open())
            if r["metric"] == "top1"]  # fmt: skip
    by_run = {r["run"]: r for r in rows}
    assert {r["method"] for r in rows} == {"PairedSupervised", "CrossModalKD", "MSTDistill"}
    assert set(crossmodal.__all__) >= {"PairedSupervised", "CrossModalKD", "MSTDistill"}
    for row in rows:
        assert 0.0 <= float(row["value"]) <= 100.0 and row["dataset"] == "FashionMNISTPairs"
    assert by_run["student"]["student"] == "test_resnet (m1)"
    assert by_run["fusion_teacher"]["student"] == "fusion(test_resnet+test_resnet)"
    assert by_run["mst"]["student"] == "test_resnet (m1)"

    # Stage 3 needs the stage-2 checkpoint; the stage-1 one is refused in one line.
    stage1 = Path(by_run["mst_stage1"]["config"]).parent / "checkpoints/last.ckpt"
    configs = Path(__file__).resolve().parent.parent / "configs/fashion_mnist_pairs"
    proc = kdzoo(
        "fit", "-c", str(configs / "defaults.yaml"), "-c", str(configs / "mst_stage3.yaml"),
        f"--model.init_args.init_from={stage1}", "--data.init_args.train_subset=200", *QUIET,
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "stage")
