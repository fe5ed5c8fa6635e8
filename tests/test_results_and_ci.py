"""Result files (CSV rows, rendered tables and plots), suite files, and the CI/README contract."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from kdzoo.bench import load_suite
from kdzoo.results import RESULT_FIELDS, append_row, plot_bars, read_rows, render_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import readme_command  # noqa: E402


def row(run: str, top1: float) -> dict:
    fields = {"method": "KD", "student": "s", "teacher": "t", "dataset": "D", "seed": 0}
    return {"run": run, "top1": top1, "epochs": 1, "git_commit": "abcdef0123456789", **fields}


def test_append_keeps_earlier_rows_and_table_shows_latest_per_run(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, row("teacher", 90.0))
    append_row(path, row("kd", 80.0))
    append_row(path, row("kd", 81.5))
    rows = read_rows(path)
    assert [r["top1"] for r in rows] == ["90.0", "80.0", "81.5"]
    table = render_table(rows)
    assert "| kd | KD | s | t | D | 81.50 |" in table
    assert "80.00" not in table
    assert table.count("\n| ") == 2  # one line per run below the header
    assert "abcdef0123" in table and "abcdef01234" not in table


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


def test_append_refuses_a_foreign_csv(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="move it away"):
        append_row(path, row("kd", 1.0))
    assert path.read_text() == "a,b\n1,2\n", "never rewritten"


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
    needed = {"method", "student", "teacher", "dataset", "top1", "seed", "epochs",
              "wall_clock_s", "config", "git_commit"}  # fmt: skip
    assert needed <= set(RESULT_FIELDS)


def test_ci_runs_the_readme_test_command():
    command = readme_command("test")
    ci = (ROOT / ".ci/run").read_text()
    assert "readme_command.py test" in ci
    for part in ("pip install", '".[dev]"', "ruff check", "ruff format --check", "pytest"):
        assert part in command
    assert "kdzoo bench run quick" in readme_command("bench")
    # The README shows each command as one line.
    readme = (ROOT / "README.md").read_text()
    assert readme.count(command) == 1


def test_readme_quick_table_is_the_rendered_one():
    """The README's quick-benchmark table is copied from results rendered by the bench."""
    readme = (ROOT / "README.md").read_text()
    assert "QUICK_TABLE" not in readme
    assert "| teacher | Supervised | resnet18 |" in readme


def test_csv_header_order_is_stable(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, row("a", 1.0))
    with path.open() as f:
        assert tuple(next(csv.reader(f))) == RESULT_FIELDS


def test_mean_error_table_and_stream_plot(tmp_path):
    from kdzoo.results import plot_stream

    path = tmp_path / "tta.csv"
    for run, error, seed in [("source", 40.0, 0), ("tent", 30.0, 0), ("tent", 34.0, 1)]:
        append_row(path, {**row(run, ""), "mean_error": error, "seed": seed})
    table = render_table(read_rows(path), reference="source", metric="mean_error")
    assert "mean error (%)" in table and "top-1" not in table
    assert "| tent | KD | s | t | D | 32.00 | 2.83 | -8.00 |" in table
    plot_bars(read_rows(path), tmp_path / "tta.png", metric="mean_error")
    stream = tmp_path / "tta_stream.csv"
    stream.write_text("batch,domain,name,images,errors\n0,0,fog-5,10,3\n1,1,snow-5,10,5\n")
    plot_stream({"tent": stream, "source": stream}, tmp_path / "stream.png", title="t")
    assert (tmp_path / "stream.png").read_bytes()[:4] == b"\x89PNG"


def test_miou_table_with_paper_column(tmp_path):
    path = tmp_path / "seg.csv"
    for run, miou in [("baseline", 30.0), ("segkd", 32.5)]:
        append_row(path, {**row(run, ""), "miou": miou, "paper_miou": 75.0, "student": "r/fcn"})
    table = render_table(read_rows(path), reference="baseline", metric="miou")
    assert "mIoU (%)" in table and "paper mIoU (%)" in table and "top-1" not in table
    assert "| segkd | KD | r/fcn | t | D | 32.50 | - | +2.50 | 75.00 |" in table
    plot_bars(read_rows(path), tmp_path / "seg.png", metric="miou")
    assert (tmp_path / "seg.png").stat().st_size > 0


def test_rows_append_to_a_file_of_an_older_kdzoo(tmp_path):
    """A results file written before a column was added takes new rows that leave the new
    columns empty; a row that needs a missing column is refused, the file untouched."""
    path = tmp_path / "old.csv"
    old_fields = [f for f in RESULT_FIELDS if f not in ("miou", "paper_miou")]
    with path.open("w", newline="") as f:
        csv.writer(f).writerow(old_fields)
    append_row(path, row("kd", 80.0))
    assert read_rows(path)[0]["top1"] == "80.0"
    before = path.read_text()
    with pytest.raises(ValueError, match="move it away"):
        append_row(path, {**row("seg", ""), "miou": 30.0})
    assert path.read_text() == before


def test_also_report_adds_rows_for_further_logged_metrics():
    from kdzoo.bench import _also_reported

    run = {"name": "lad_teacher", "also_report": {"lad_no_label": "test/miou_no_label"}}
    base = {"run": "lad_teacher", "miou": 40.0, "seed": 0}
    (extra,) = _also_reported(run, base, {"test/miou_no_label": 0.25}, "miou")
    assert extra == {"run": "lad_no_label", "miou": 25.0, "seed": 0}
    with pytest.raises(SystemExit, match="did not log"):
        _also_reported(run, base, {}, "miou")
