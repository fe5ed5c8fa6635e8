"""Result files (long-format CSV rows, rendered tables and plots), suite files, and the CI/README
contract."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from kdzoo.bench import load_suite
from kdzoo.results import (
    RESULT_FIELDS,
    WideFormatError,
    append_row,
    append_rows,
    in_percent,
    metric_rows,
    plot_bars,
    read_rows,
    render_table,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import readme_command  # noqa: E402


def row(run: str, value: float, metric: str = "top1", **more) -> dict:
    fields = {"method": "KD", "student": "s", "teacher": "t", "dataset": "D", "seed": 0}
    common = {"run": run, "epochs": 1, "git_commit": "abcdef0123456789", **fields}
    return {**common, "metric": metric, "value": value, **more}


def test_append_keeps_earlier_rows_and_table_shows_latest_per_run(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, row("teacher", 90.0))
    append_row(path, row("kd", 80.0))
    append_row(path, row("kd", 81.5))
    rows = read_rows(path)
    assert [r["value"] for r in rows] == ["90.0", "80.0", "81.5"]
    table = render_table(rows)
    assert "| kd | KD | s | t | D | 81.50 |" in table
    assert "80.00" not in table
    assert table.count("\n| ") == 2  # one line per run below the header
    assert "abcdef0123" in table and "abcdef01234" not in table


def test_one_row_per_metric_and_the_table_picks_its_metric(tmp_path):
    """A run's rows hold every metric it logged; a table shows one metric, and only the runs
    that logged it (a new task adds rows, never a column)."""
    path = tmp_path / "r.csv"
    append_rows(path, [row("kd", 80.0), row("kd", 0.61, "loss"), row("seg", 30.0, "miou")])
    with path.open() as f:
        assert tuple(next(csv.reader(f))) == RESULT_FIELDS
    rows = read_rows(path)
    assert [(r["run"], r["metric"]) for r in rows] == [
        ("kd", "top1"), ("kd", "loss"), ("seg", "miou")
    ]  # fmt: skip
    top1 = render_table(rows)
    assert "| top1 (%) |" in top1 and "| kd |" in top1 and "| seg |" not in top1
    miou = render_table(rows, metric="miou", header="mIoU (%)")
    assert "| mIoU (%) |" in miou and "| seg | KD | s | t | D | 30.00 |" in miou
    assert "| kd |" not in miou
    assert "| loss |" in render_table(rows, metric="loss")  # not a fraction: no "(%)"


def test_metric_rows_scale_fractions_only():
    """Accuracies and IoUs (logged in [0, 1]) are written in %, anything else as logged."""
    logged = {
        "test/top1": 0.8125,
        "test/top5": 0.99,
        "test/miou_no_label": 0.25,
        "test/pixel_acc": 0.5,
        "test/loss": 0.4321,
        "test/mean_error": 17.5,
        "test/error_fog-5#2": 20.0,
        "val/top1": 0.7,  # not a test metric: no row
    }
    rows = metric_rows({"run": "r", "seed": 0}, logged, {"top1": 73.33})
    values = {r["metric"]: r["value"] for r in rows}
    assert values == {
        "error_fog-5#2": 20.0,
        "loss": 0.4321,
        "mean_error": 17.5,
        "miou_no_label": 25.0,
        "pixel_acc": 50.0,
        "top1": 81.25,
        "top5": 99.0,
    }
    assert [r["metric"] for r in rows] == sorted(values)
    assert {r["metric"]: r["paper"] for r in rows}["top1"] == 73.33
    assert {r["metric"]: r["paper"] for r in rows}["top5"] == ""
    with pytest.raises(ValueError, match="not a fraction"):
        in_percent("top1", 81.25)  # already in %: a bug upstream, not silently x100


def test_table_averages_the_newest_row_of_each_seed(tmp_path):
    path = tmp_path / "r.csv"
    for run, top1, seed in [("kd", 70.0, 0), ("kd", 80.0, 0), ("kd", 84.0, 1), ("nd", 83.0, 0)]:
        append_row(path, {**row(run, top1), "seed": seed})
    table = render_table(read_rows(path), reference="kd")
    # kd: mean of 80 (newest seed-0 row) and 84, sd = sqrt(8); nd: one seed, no sd.
    assert "| kd | KD | s | t | D | 82.00 | 2.83 | +0.00 |" in table
    assert "| nd | KD | s | t | D | 83.00 | - | +1.00 |" in table
    assert "| 0,1 |" in table and "vs kd" in table
    assert "vs kd" not in render_table(read_rows(path))


def test_table_columns_notes_and_extra_columns(tmp_path):
    """A suite's table block picks the columns, adds notes and columns that average matching
    metrics (the passes of a repeated TTA stream), averaged over seeds."""
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for name, error in (("fog-5", 10.0), ("snow-5", 20.0), ("fog-5#2", 30.0)):
            rows.append(row("tent", error + shift, f"error_{name}", seed=seed))
        rows.append(row("tent", 20.0 + shift, "mean_error", seed=seed, wall_clock_s=10 + 2 * seed))
    path = tmp_path / "tta.csv"
    append_rows(path, rows)
    table = render_table(
        read_rows(path),
        metric="mean_error",
        columns=["run", "value", "pass 1", "pass 2", "time"],
        extra={"pass 1": "error_[^#]+", "pass 2": "error_.+#2"},
        notes={"tent": "entropy"},
    )
    assert table.splitlines()[0] == "| run | note | mean_error | pass 1 | pass 2 | time (s) |"
    assert table.splitlines()[2] == "| tent | entropy | 21.00 | 16.00 | 31.00 | 11 |"
    with pytest.raises(ValueError, match="unknown table columns"):
        render_table(read_rows(path), metric="mean_error", columns=["run", "bogus"])


def test_paper_column_only_where_a_paper_number_is_set(tmp_path):
    path = tmp_path / "seg.csv"
    for run, miou in [("baseline", 30.0), ("segkd", 32.5)]:
        append_row(path, row(run, miou, "miou", paper=75.0, student="r/fcn"))
    table = render_table(read_rows(path), reference="baseline", metric="miou")
    assert "| paper |" in table
    assert "| segkd | KD | r/fcn | t | D | 32.50 | - | +2.50 | 75.00 |" in table
    plot_bars(read_rows(path), tmp_path / "seg.png", metric="miou")
    assert (tmp_path / "seg.png").stat().st_size > 0
    assert "| paper |" not in render_table([row("kd", 80.0)])


def test_append_refuses_a_foreign_csv(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="move it away"):
        append_row(path, row("kd", 1.0))
    assert path.read_text() == "a,b\n1,2\n", "never rewritten"


def test_wide_format_file_is_refused_with_the_conversion_command(tmp_path):
    """A results CSV of kdzoo before the long format: neither appended to nor rendered; the
    error says how to convert it."""
    path = tmp_path / "quick.csv"
    wide = "run,method,student,teacher,dataset,top1,mean_error,miou,paper_top1,paper_miou,seed\n"
    path.write_text(wide + "kd,KD,s,t,D,80.0,,,,,0\n")
    before = path.read_text()
    for call in (lambda: read_rows(path), lambda: append_row(path, row("kd", 1.0))):
        with pytest.raises(WideFormatError, match=r"tools/convert_results\.py"):
            call()
    assert path.read_text() == before


def test_plot_is_written(tmp_path):
    plot_bars([row("a", 50.0), row("b", 60.0)], tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_render_tool_regenerates_table_from_csv(tmp_path):
    path = tmp_path / "quick.csv"
    append_row(path, row("kd", 77.25))
    subprocess.run([sys.executable, str(ROOT / "tools/render_results.py"), str(path)], check=True,
                   capture_output=True)  # fmt: skip
    assert "77.25" in (tmp_path / "quick.md").read_text()
    assert (tmp_path / "quick.png").is_file()


def test_quick_suite_is_valid():
    suite = load_suite("quick", ROOT / "configs")
    assert [r["name"] for r in suite["runs"]][:3] == ["teacher", "baseline", "kd"]
    for run in suite["runs"]:
        for config in [*suite["base"], *run["configs"]]:
            assert (ROOT / "configs" / config).is_file(), config


def test_suite_teacher_must_come_first(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench/bad.yaml").write_text(
        "runs:\n  - {name: kd, configs: [], teacher: teacher}\n  - {name: teacher, configs: []}\n"
    )
    with pytest.raises(SystemExit, match="needs teacher run 'teacher' to come before it"):
        load_suite("bad", tmp_path)


def test_result_fields_cover_the_issue():
    needed = {"method", "student", "teacher", "dataset", "metric", "value", "paper", "seed",
              "epochs", "wall_clock_s", "config", "git_commit"}  # fmt: skip
    assert needed <= set(RESULT_FIELDS)


def test_ci_runs_the_readme_test_command():
    command = readme_command("test")
    ci = (ROOT / ".ci/run").read_text()
    assert "readme_command.py test" in ci
    for part in ("pip install", '".[dev]"', "ruff check", "ruff format --check", "pytest"):
        assert part in command
    # CI fails when a README result table differs from the committed results.
    assert "kdzoo bench tables --check" in command
    assert "kdzoo bench run quick" in readme_command("bench")
    # The README shows each command as one line.
    readme = (ROOT / "README.md").read_text()
    assert readme.count(command) == 1


def test_mean_error_stream_plot(tmp_path):
    from kdzoo.results import plot_stream

    path = tmp_path / "tta.csv"
    for run, error, seed in [("source", 40.0, 0), ("tent", 30.0, 0), ("tent", 34.0, 1)]:
        append_row(path, row(run, error, "mean_error", seed=seed))
    table = render_table(read_rows(path), reference="source", metric="mean_error")
    assert "| tent | KD | s | t | D | 32.00 | 2.83 | -8.00 |" in table
    plot_bars(read_rows(path), tmp_path / "tta.png", metric="mean_error")
    stream = tmp_path / "tta_stream.csv"
    stream.write_text("batch,domain,name,images,errors\n0,0,fog-5,10,3\n1,1,snow-5,10,5\n")
    plot_stream({"tent": stream, "source": stream}, tmp_path / "stream.png", title="t")
    assert (tmp_path / "stream.png").read_bytes()[:4] == b"\x89PNG"


def test_also_report_adds_rows_for_further_logged_metrics():
    from kdzoo.bench import _also_reported

    run = {"name": "lad_teacher", "also_report": {"lad_no_label": "test/miou_no_label"}}
    common = {"run": "lad_teacher", "seed": 0}
    (extra,) = _also_reported(run, common, {"test/miou_no_label": 0.25}, "miou")
    assert extra == {"run": "lad_no_label", "seed": 0, "metric": "miou", "value": 25.0,
                     "paper": ""}  # fmt: skip
    with pytest.raises(SystemExit, match="did not log"):
        _also_reported(run, common, {}, "miou")
