"""The README's result tables are rendered from the committed ``benchmarks/*.csv``
(``kdzoo bench tables [--check]``), ``kdzoo bench run --record`` appends to those files and
nothing else does, and ``tools/convert_results.py`` turns a wide-format results CSV into the
long format."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdzoo.bench import main as bench_main
from kdzoo.bench import run_suite, runs_table_spec
from kdzoo.results import COST_FIELDS, append_rows, read_rows

ROOT = Path(__file__).resolve().parent.parent
KDZOO = str(Path(sys.executable).with_name("kdzoo"))


def tables(*args: str) -> int:
    """``kdzoo bench tables ARGS`` in this process: its exit status."""
    with pytest.raises(SystemExit) as exit_:
        bench_main(["tables", *args])
    return exit_.value.code


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the README, benchmarks/ and the suites: a place to edit."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    shutil.copytree(ROOT / "configs/bench", tmp_path / "configs/bench")
    return tmp_path


def options(root: Path) -> list[str]:
    return [
        f"--readme={root / 'README.md'}",
        f"--benchmarks_dir={root / 'benchmarks'}",
        f"--configs_dir={root / 'configs'}",
    ]


def test_the_repository_readme_matches_the_committed_results():
    """What CI runs: every README table is the render of the committed results, and every
    committed results file is shown in a table."""
    proc = subprocess.run(
        [KDZOO, "bench", "tables", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and not proc.stderr
    readme = (ROOT / "README.md").read_text()
    committed = [p for p in sorted((ROOT / "benchmarks").glob("*.csv")) if "_fast" not in p.stem]
    assert committed
    for path in committed:
        suite = path.stem.removesuffix("_active").removesuffix("_cost")
        assert f"<!-- kdzoo:table {suite} -->" in readme, path


def test_an_edited_cell_fails_the_check_naming_the_table(checkout, capsys):
    readme = checkout / "README.md"
    text = readme.read_text()
    name, body_start = _first_block(text)
    line_start = text.index("\n", text.index("\n|---", body_start) + 1) + 1  # first data line
    line_end = text.index("\n", line_start)
    cells = text[line_start:line_end].split(" | ")
    number = next(i for i, c in enumerate(cells) if re.fullmatch(r"-?\d+\.\d\d", c))
    cells[number] = "99.99" if cells[number] != "99.99" else "11.11"
    readme.write_text(text[:line_start] + " | ".join(cells) + text[line_end:])
    edited = readme.read_text()

    assert tables("--check", *options(checkout)) == 1
    assert f": {name} (run `kdzoo bench tables`" in capsys.readouterr().err  # it, no other
    assert readme.read_text() == edited, "--check never writes"

    assert tables(*options(checkout)) == 0  # rewrites the table in place
    assert readme.read_text() == text
    capsys.readouterr()
    assert tables("--check", *options(checkout)) == 0


def _first_block(text: str) -> tuple[str, int]:
    match = re.search(r"<!-- kdzoo:table (\S+) -->\n", text)
    assert match, "the README has no rendered table"
    return match.group(1), match.end()


@pytest.fixture
def mini_tables(tmp_path: Path) -> Path:
    """A README with one table of a suite ``mini`` whose table block declares it."""
    (tmp_path / "configs/bench").mkdir(parents=True)
    (tmp_path / "configs/bench/mini.yaml").write_text(
        "metric: top1\nreference: kd\nruns: []\n"
        "table: {columns: [run, value, sd, reference, seeds], notes: {kd: plain KD}}\n"
    )
    rows = [
        {"run": run, "metric": metric, "value": value, "seed": seed, "git_commit": "abc"}
        for run, seed, top1 in (("kd", 0, 80.0), ("kd", 1, 82.0), ("nd", 0, 83.5))
        for metric, value in (("top1", top1), ("loss", 0.5))
    ]
    (tmp_path / "benchmarks").mkdir()
    append_rows(tmp_path / "benchmarks/mini.csv", rows)
    (tmp_path / "README.md").write_text(
        "# x\n\nbefore\n\n<!-- kdzoo:table mini -->\nhand-typed\n<!-- /kdzoo:table -->\n\nafter\n"
    )
    return tmp_path


def test_tables_render_between_the_markers_from_the_csv(mini_tables, capsys):
    assert tables("--check", *options(mini_tables)) == 1
    assert ": mini (run" in capsys.readouterr().err
    assert tables(*options(mini_tables)) == 0
    assert (mini_tables / "README.md").read_text() == (
        "# x\n\nbefore\n\n<!-- kdzoo:table mini -->\n\n"
        "| run | note | top1 (%) | sd | vs kd | seeds |\n"
        "|---|---|---|---|---|---|\n"
        "| kd | plain KD | 81.00 | 1.41 | +0.00 | 0,1 |\n"
        "| nd |  | 83.50 | - | +2.50 | 0 |\n"
        "\n<!-- /kdzoo:table -->\n\nafter\n"
    )
    capsys.readouterr()
    assert tables("--check", *options(mini_tables)) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and not out.err

    # A new committed row changes the render: the check fails until the README is rewritten.
    append_rows(
        mini_tables / "benchmarks/mini.csv",
        [{"run": "nd", "metric": "top1", "value": 84.5, "seed": 1}],
    )
    assert tables("--check", *options(mini_tables)) == 1
    tables(*options(mini_tables))
    assert "| nd |  | 84.00 | 0.71 | +3.00 | 0,1 |" in (mini_tables / "README.md").read_text()


def test_a_marker_without_results_is_an_error(mini_tables):
    (mini_tables / "benchmarks/mini.csv").unlink()
    status = tables("--check", *options(mini_tables))  # SystemExit with the message
    assert "mini.csv, which does not exist" in str(status)


def test_a_pivot_table_shows_each_strategys_cost_from_the_cost_csv(tmp_path):
    """An active-learning pivot declares cost columns, joined by strategy from
    benchmarks/<suite>_cost.csv; any other column is refused, naming the allowed ones."""
    (tmp_path / "configs/bench").mkdir(parents=True)
    suite = tmp_path / "configs/bench/al.yaml"
    suite.write_text(
        "runs: []\ntable:\n  csv: al_active.csv\n"
        "  pivot: {rows: strategy, columns: n_labelled, value: test_top1}\n"
        "  columns: [params, macs]\n"
    )
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks/al_active.csv").write_text(
        "strategy,seed,round,n_labelled,test_top1\nrandom,0,0,10,50.0\nbadge,0,0,10,55.0\n"
    )
    cost = {"run": "random", "params": 1_500_000, "macs": 20_000_000}
    append_rows(tmp_path / "benchmarks/al_cost.csv", [cost], COST_FIELDS)
    (tmp_path / "README.md").write_text("<!-- kdzoo:table al -->\n<!-- /kdzoo:table -->\n")
    assert tables(*options(tmp_path)) == 0
    assert (tmp_path / "README.md").read_text() == (
        "<!-- kdzoo:table al -->\n\n"
        "| strategy | 10 | params (M) | MACs (M) | seeds |\n"
        "|---|---|---|---|---|\n"
        "| random | 50.00 | 1.50 | 20.0 | 0 |\n"
        "| badge | 55.00 | - | - | 0 |\n"
        "\n<!-- /kdzoo:table -->\n"
    )
    suite.write_text(suite.read_text().replace("macs]", "macs, seeds]"))
    message = str(tables("--check", *options(tmp_path)))
    assert "table 'al'" in message and "['seeds']" in message
    assert "allowed: ['params', 'macs', 'eager', 'ort']" in message


def test_the_runs_table_of_a_pivot_suite_leaves_out_the_pivots_cost_columns():
    """``kdzoo bench run`` renders <out>/<suite>.md of the suite's own runs: a pivot's cost
    columns (joined by strategy) are not that table's columns."""
    pivot = {"rows": "strategy", "columns": "n_labelled", "value": "test_top1"}
    table = {"csv": "al_active.csv", "pivot": pivot, "columns": ["params", "macs"]}
    assert runs_table_spec({"runs": [], "table": table}) == {"metric": "top1"}
    plain = {"runs": [], "table": {"columns": ["run", "value", "params"]}}
    assert runs_table_spec(plain) == {"columns": ["run", "value", "params"], "metric": "top1"}


# ---- --record -------------------------------------------------------------------------------
class _Model:
    def result_names(self) -> dict[str, str]:
        return {"student": "tiny", "teacher": "big"}


class _CLI:
    """Stands in for KDCLI: a "fit" that logged top-1 0.5 and a loss, no training."""

    def __init__(self, args: list[str]) -> None:
        save_dir = next(a for a in args if a.startswith("--trainer.logger.init_args.save_dir="))
        name = next(a for a in args if a.startswith("--trainer.logger.init_args.name="))
        log_dir = Path(save_dir.split("=", 1)[1]) / name.split("=", 1)[1]
        self.model, self.datamodule, self.subcommand = _Model(), SimpleNamespace(), args[0]
        self.config = {"fit": {"paper": {"top1": 70.0}}}
        metrics = {"test/top1": 0.5, "test/loss": 1.25}
        self.trainer = SimpleNamespace(
            log_dir=str(log_dir),
            current_epoch=3,
            checkpoint_callback=SimpleNamespace(best_model_path=str(log_dir / "best.ckpt")),
            test=lambda *a, **k: [metrics],
        )


@pytest.fixture
def mini_suite(tmp_path, monkeypatch):
    import kdzoo.lightning_cli

    monkeypatch.setattr(kdzoo.lightning_cli, "KDCLI", _CLI)
    (tmp_path / "configs/bench").mkdir(parents=True)
    (tmp_path / "configs/bench/mini.yaml").write_text(
        "reference: a\nruns:\n  - {name: a, configs: []}\n"
        "  - {name: b, configs: [], teacher: a, paper: {top1: 80.0}}\n"
    )
    (tmp_path / "benchmarks").mkdir()
    return tmp_path


def test_record_appends_to_the_benchmarks_dir_and_only_with_record(mini_suite):
    root, benchmarks = mini_suite, mini_suite / "benchmarks"
    common = {"configs_dir": root / "configs", "benchmarks_dir": benchmarks}
    rows = run_suite("mini", out=root / "out", **common)
    assert list(benchmarks.iterdir()) == [], "without --record nothing committed is touched"
    assert [(r["run"], r["metric"], r["value"]) for r in rows] == [
        ("a", "loss", 1.25), ("a", "top1", 50.0), ("b", "loss", 1.25), ("b", "top1", 50.0)
    ]  # fmt: skip
    assert {r["student"] for r in rows} == {"tiny"} and {r["method"] for r in rows} == {"_Model"}
    assert [r["paper"] for r in rows if r["metric"] == "top1"] == [70.0, 80.0]  # run overrides

    run_suite("mini", out=root / "out", seed=1, record=True, **common)
    recorded = read_rows(benchmarks / "mini.csv")
    assert [(r["run"], r["metric"], r["seed"]) for r in recorded] == [
        ("a", "loss", "1"), ("a", "top1", "1"), ("b", "loss", "1"), ("b", "top1", "1")
    ]  # fmt: skip
    assert len(read_rows(root / "out/mini.csv")) == 8  # the results dir has both seeds
    run_suite("mini", out=root / "out", fast=True, record=True, **common)
    assert (benchmarks / "mini_fast.csv").is_file(), "--fast records apart from the real rows"
    assert len(read_rows(benchmarks / "mini.csv")) == 4


def test_record_needs_an_existing_benchmarks_dir(mini_suite):
    with pytest.raises(SystemExit, match="--benchmarks_dir"):
        run_suite(
            "mini",
            out=mini_suite / "out",
            configs_dir=mini_suite / "configs",
            record=True,
            benchmarks_dir=mini_suite / "missing",
        )
    assert not (mini_suite / "out").exists(), "refused before any run"


# ---- tools/convert_results.py -----------------------------------------------------------------
WIDE = (
    "run,method,student,teacher,dataset,top1,mean_error,miou,paper_top1,paper_miou,seed,epochs,"
    "wall_clock_s,config,git_commit,finished_at\n"
)


def convert(*args: str) -> subprocess.CompletedProcess:
    tool = str(ROOT / "tools/convert_results.py")
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)


def test_converter_turns_a_wide_csv_into_long_rows(tmp_path):
    """Wide metric columns become rows; where the run's log is there, every test metric it
    logged (scaled as kdzoo bench scales it); an also_report row keeps its one metric."""
    log = tmp_path / "runs/seg/lad/version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text(
        "epoch,step,test/loss,test/miou,test/miou_no_label,val/miou\n"
        "0,9,,,,0.2\n1,10,0.75,0.3,0.25,\n"
    )
    old = tmp_path / "old.csv"
    old.write_text(
        WIDE
        + "kd,KD,s,t,D,81.25,,,73.5,,0,3,20.5,gone/config.yaml,abc,2026-01-01\n"
        + "tent,Tent,s,,C,,17.5,,,,1,0,2.0,,abc,2026-01-01\n"
        + f"lad,LADTeacher,s,,M,,,30.0,,75.0,0,3,9.0,{log}/config.yaml,abc,2026-01-01\n"
        + f"lad_no_label,LADTeacher,s,,M,,,25.0,,,0,3,9.0,{log}/config.yaml,abc,2026-01-01\n"
    )
    new = tmp_path / "new.csv"
    proc = convert(str(old), str(new))
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(new)
    got = [(r["run"], r["metric"], r["value"], r["paper"]) for r in rows]
    assert got == [
        ("kd", "top1", "81.25", "73.5"),
        ("tent", "mean_error", "17.5", ""),
        ("lad", "loss", "0.75", ""),
        ("lad", "miou", "30.0", "75.0"),
        ("lad", "miou_no_label", "25.0", ""),
        ("lad_no_label", "miou", "25.0", ""),
    ]
    assert rows[0]["seed"] == "0" and rows[1]["seed"] == "1" and rows[0]["epochs"] == "3"
    assert convert(str(old), str(new)).returncode != 0, "never rewrites a file"
    (tmp_path / "plain.csv").unlink(missing_ok=True)
    assert convert(str(old), str(tmp_path / "plain.csv"), "--no-logs").returncode == 0
    assert len(read_rows(tmp_path / "plain.csv")) == 4


def test_converter_refuses_a_log_that_disagrees(tmp_path):
    log = tmp_path / "runs/q/kd/version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("epoch,step,test/top1\n1,10,0.5\n")
    old = tmp_path / "old.csv"
    old.write_text(WIDE + f"kd,KD,s,t,D,81.25,,,,,0,3,1,{log}/config.yaml,abc,x\n")
    proc = convert(str(old), str(tmp_path / "new.csv"))
    assert proc.returncode != 0 and "--no-logs" in proc.stderr


def test_converter_adds_the_commit_to_active_rounds(tmp_path):
    rounds = tmp_path / "rounds.csv"
    rounds.write_text(
        "strategy,seed,round,n_labelled,test_top1,wall_clock_s\nrandom,0,0,10,50.0,8.0\n"
    )
    assert convert(str(rounds), str(tmp_path / "a.csv")).returncode != 0  # needs the commit
    assert convert(str(rounds), str(tmp_path / "a.csv"), "--git_commit", "abc").returncode == 0
    text = (tmp_path / "a.csv").read_text()
    assert text.splitlines()[0].endswith(",git_commit") and text.splitlines()[1].endswith(",abc")


def test_record_adds_the_active_rounds_with_the_commit(tmp_path):
    from kdzoo.bench import _record, git_commit

    active = tmp_path / "out/suite_active"
    active.mkdir(parents=True)
    (active / "rounds.csv").write_text(
        "strategy,seed,round,n_labelled,test_top1,wall_clock_s\n"
        "random,0,0,10,50.0,8.0\nrandom,0,1,20,55.0,8.5\n"
    )
    (tmp_path / "benchmarks").mkdir()
    _record([], active, tmp_path / "benchmarks", "suite", active=True)
    with (tmp_path / "benchmarks/suite_active.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["n_labelled"], r["test_top1"]) for r in rows] == [("10", "50.0"), ("20", "55.0")]
    assert {r["git_commit"] for r in rows} == {git_commit()}


def test_an_unclosed_marker_or_a_wrong_table_block_is_a_clear_error(mini_tables):
    readme = mini_tables / "README.md"
    readme.write_text(readme.read_text().replace("<!-- /kdzoo:table -->", ""))
    assert "needs a `<!-- /kdzoo:table -->`" in str(tables("--check", *options(mini_tables)))
    readme.write_text("<!-- kdzoo:table mini -->\n<!-- /kdzoo:table -->\n")
    suite = mini_tables / "configs/bench/mini.yaml"
    suite.write_text(suite.read_text().replace("seeds]", "seeds, bogus]"))
    message = str(tables("--check", *options(mini_tables)))
    assert "table 'mini'" in message and "bogus" in message
