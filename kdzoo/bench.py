"""``kdzoo bench``: run a benchmark suite of training runs, record its results, render tables.

A suite is a YAML file ``configs/bench/<suite>.yaml``: config files shared by every run, a list
of runs (each a list of config files, optional extra CLI arguments, and optionally the earlier
run whose best checkpoint is its teacher), and the overrides of the ``--fast`` preset. In a run's
arguments ``{best:RUN}`` stands for the best checkpoint of the earlier run ``RUN`` (e.g. several
specialist teachers, or a fine-tuned teacher's initial weights). A run with ``command: test``
evaluates without training (test-time adaptation: the model adapts during ``kdzoo test``); a
suite's ``metric`` (a logged test metric without ``test/``: ``top1``, ``mean_error``, ``miou``)
is what its table and bar chart show, and runs that write a ``tta_stream.csv`` are drawn together
in ``<suite>_stream.png``. ``fast`` may be a dict of presets per command, and a run's
``fast_args`` are added in ``--fast`` mode. A run's ``also_report: {NAME: LOGGED_KEY}`` adds a row
``NAME`` holding another metric the run logged under the suite's metric (e.g. a label-assisted
teacher's mIoU without its label input), and its ``paper: {METRIC: VALUE}`` overrides the config's
``paper`` numbers. Adding a method to a suite is adding a run to that file.

Every run trains with ``kdzoo fit`` (the same :class:`~kdzoo.lightning_cli.KDCLI`), is evaluated on
the test split with its best checkpoint, and appends one row per logged test metric (the long
format of :mod:`kdzoo.results`) to ``<out>/<suite>.csv``; ``<suite>.md`` and ``<suite>.png`` are
rendered from the CSV. A suite's ``active:`` block (``configs``, ``args``) then runs an
active-learning experiment (:func:`kdzoo.active.loop.run_active`) into ``<out>/<suite>_active/``.
With ``--record`` the suite's rows are also appended to the committed
``benchmarks/<suite>.csv`` (and the active part's rounds, with the commit, to
``benchmarks/<suite>_active.csv``); without it nothing committed is touched.

``kdzoo bench tables`` renders the README's result tables from ``benchmarks/``: the lines between
``<!-- kdzoo:table SUITE -->`` and ``<!-- /kdzoo:table -->`` are the table that suite's ``table:``
block declares, with these keys (all optional)::

    table:
      csv: SUITE.csv          # the file under benchmarks/ (default <suite>.csv)
      metric: top1            # the metric shown (default: the suite's metric, else top1)
      reference: kd           # a "vs kd" column (default: the suite's reference)
      header: top-1 (%)       # the metric column's header
      columns: [run, method, student, teacher, value, sd, reference, epochs, seeds, time, commit]
      extra: {pass 1: 'error_[^#]+'}   # column: mean of the run's metrics matching the regex
      notes: {kd++: KD++}     # a "note" column
      pivot: {rows: strategy, columns: n_labelled, value: test_top1, header: '{} labels'}
                              # instead: value by rows x columns, mean ± sd over seeds; with a
                              # pivot, columns may only name cost columns: [params, macs, eager,
                              # ort], after the value columns, joined by the row (the strategy)

The cost columns ``params``, ``macs``, ``eager`` and ``ort`` come from
``benchmarks/<suite>_cost.csv`` (``tools/bench_cost.py``, :mod:`kdzoo.cost`), one row per run,
and per selection strategy of the suite's active part; ``-`` where a run has none.

``--check`` changes nothing and fails, naming the tables, when the README differs from the render.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from kdzoo.results import (
    append_rows,
    in_percent,
    metric_rows,
    plot_bars,
    plot_stream,
    read_cost,
    read_rows,
    render_spec,
)

__all__ = ["load_suite", "main", "render_readme_tables", "run_suite", "runs_table_spec"]

SOURCE_ROOT = Path(__file__).resolve().parent.parent
# A README table: its marker names the suite, the lines up to the closing marker are rendered.
TABLE_BLOCK = re.compile(
    r"^(<!-- kdzoo:table (\S+) -->\n)(.*?)^(<!-- /kdzoo:table -->)$", re.DOTALL | re.MULTILINE
)
TABLE_OPENER = re.compile(r"^<!-- kdzoo:table \S+ -->$", re.MULTILINE)


def default_configs_dir() -> Path:
    """``./configs`` when it has suites, else the ``configs/`` of the kdzoo source checkout."""
    local = Path("configs")
    if (local / "bench").is_dir():
        return local
    return SOURCE_ROOT / "configs"


def load_suite(name: str, configs_dir: Path) -> dict[str, Any]:
    path = configs_dir / "bench" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / "bench").glob("*.yaml"))
        raise SystemExit(f"error: no benchmark suite {name!r} ({path} missing); suites: {known}")
    suite = yaml.safe_load(path.read_text())
    names = [run["name"] for run in suite["runs"]]
    for run in suite["runs"]:
        teacher = run.get("teacher")
        if teacher is not None and teacher not in names[: names.index(run["name"])]:
            raise SystemExit(
                f"error: in {path}, run {run['name']!r} needs teacher run "
                f"{teacher!r} to come before it"
            )
    return suite


def table_spec(suite: Mapping[str, Any]) -> dict[str, Any]:
    """The suite's ``table:`` block, its metric and reference defaulting to the suite's."""
    spec = dict(suite.get("table") or {})
    spec.setdefault("metric", suite.get("metric", "top1"))
    if suite.get("reference") is not None:
        spec.setdefault("reference", suite["reference"])
    return spec


def runs_table_spec(suite: Mapping[str, Any]) -> dict[str, Any]:
    """The table of the suite's own runs (``<out>/<suite>.md``, from ``<out>/<suite>.csv``): its
    ``table:`` block without what belongs to a README table of another CSV: ``csv``, ``pivot``
    and, with a pivot, the pivot's ``columns`` (cost columns joined by strategy, which the
    runs' table would show alone)."""
    spec = table_spec(suite)
    dropped = {"csv", "pivot", *(["columns"] if spec.get("pivot") else [])}
    return {k: v for k, v in spec.items() if k not in dropped}


def run_suite(
    name: str,
    *,
    fast: bool = False,
    out: Path = Path("results"),
    seed: int = 0,
    download: bool = False,
    configs_dir: Path | None = None,
    record: bool = False,
    benchmarks_dir: Path | None = None,
    teacher_cache: bool | None = None,
) -> list[dict[str, Any]]:
    """Train and test every run of suite ``name``; return the rows it appended. With ``record``
    the rows (and an active part's rounds) are also appended under ``benchmarks_dir``.

    In a suite that sets ``teacher_cache`` (true or false), the students (runs with a
    ``teacher:``) see exact-replay views (``augment_seed`` = ``seed``); with it true they train
    from one cache per teacher (:mod:`kdzoo.cache.suite`, built when first needed, its time
    counted in that student's; values stored in the suite's ``teacher_cache_dtype``, default
    float16), else from the live teacher. ``teacher_cache`` overrides the
    suite's setting (the online run to compare a cached one with)."""
    from kdzoo.cache.suite import cached_teacher_args
    from kdzoo.lightning_cli import KDCLI

    configs_dir = configs_dir or default_configs_dir()
    suite = load_suite(name, configs_dir)
    table = f"{name}_fast" if fast else name
    out = Path(out)
    if record:
        benchmarks_dir = _benchmarks_dir(benchmarks_dir)
    best: dict[str, str] = {}
    streams: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    metric = suite.get("metric", "top1")
    data_args = _prepare_corruptions(suite.get("corruptions"), fast, out)
    for run in suite["runs"]:
        command = run.get("command", "fit")
        if command not in ("fit", "test"):
            raise SystemExit(f"error: run {run['name']!r}: command must be fit or test")
        args = [command]
        for config in [*suite.get("base", []), *run.get("configs", [])]:
            args += ["-c", str(configs_dir / config)]
        args += [_fill_checkpoints(arg, best) for arg in run.get("args", [])]
        if fast:  # a list for every run, or {fit: [...], test: [...]}; then the run's own
            preset = suite.get("fast", [])
            args += preset.get(command, []) if isinstance(preset, dict) else preset
            args += [_fill_checkpoints(arg, best) for arg in run.get("fast_args", [])]
        replay = run.get("teacher") and "teacher_cache" in suite
        if run.get("teacher"):
            args.append(f"--model.init_args.teacher.weights={best[run['teacher']]}")
        if replay:  # cached or live, the same views (so the two compare)
            args.append(f"--data.init_args.augment_seed={seed}")
        if download and command == "fit":
            args.append("--data.init_args.download=true")
        args += data_args if command == "test" else []
        args += [
            f"--seed_everything={seed}",
            f"--trainer.logger.init_args.save_dir={out / 'runs' / table}",
            f"--trainer.logger.init_args.name={run['name']}",
        ]
        start = time.perf_counter()
        if replay and (suite["teacher_cache"] if teacher_cache is None else teacher_cache):
            caches = out / "caches" / table / f"seed{seed}"
            dtype = suite.get("teacher_cache_dtype", "float16")
            args += cached_teacher_args(args, caches, run["teacher"], dtype=dtype)
        cli = KDCLI(args=args)
        if command == "fit":
            best[run["name"]] = cli.trainer.checkpoint_callback.best_model_path
            metrics = cli.trainer.test(
                cli.model, datamodule=cli.datamodule, ckpt_path=best[run["name"]]
            )[0]
        else:  # the test (e.g. a test-time adaptation stream) has run: read what it logged
            metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
            stream = Path(cli.trainer.log_dir) / "tta_stream.csv"
            if stream.is_file():
                streams[run["name"]] = stream
        run_rows = _rows(run, cli, metrics, seed, start, metric)
        append_rows(out / f"{table}.csv", run_rows)
        rows += run_rows
    if suite.get("active"):
        _run_active_part(suite["active"], best, configs_dir, out / f"{table}_active", fast)
    if record:
        _record(rows, out / f"{table}_active", benchmarks_dir, table, bool(suite.get("active")))
    if not rows:
        return rows
    all_rows = read_rows(out / f"{table}.csv")
    title = f"kdzoo bench {name}{' --fast' if fast else ''}"
    markdown = f"## {title}\n\n" + render_spec(runs_table_spec(suite), all_rows)
    (out / f"{table}.md").write_text(markdown)
    plot_bars(all_rows, out / f"{table}.png", title=f"{title}: {metric}", metric=metric)
    if streams:
        plot_stream(streams, out / f"{table}_stream.png", title=f"{title}: error along the stream")
    print(markdown)
    return rows


def _benchmarks_dir(path: Path | None) -> Path:
    """``path``, or the ``benchmarks/`` of the kdzoo source checkout (which must exist)."""
    path = Path(path) if path is not None else SOURCE_ROOT / "benchmarks"
    if not path.is_dir():
        raise SystemExit(
            f"error: --record appends to {path}, which does not exist: run from a kdzoo source "
            "checkout or pass --benchmarks_dir"
        )
    return path


def _record(
    rows: list[dict[str, Any]], active_out: Path, benchmarks: Path, table: str, active: bool
) -> None:
    """``--record``: the suite's rows to ``benchmarks/<table>.csv``; an active part's rounds
    (``rounds.csv``) with this commit to ``benchmarks/<table>_active.csv``."""
    from kdzoo.active.report import ROUND_FIELDS

    append_rows(benchmarks / f"{table}.csv", rows)
    print(f"kdzoo bench: recorded {len(rows)} rows in {benchmarks / f'{table}.csv'}")
    rounds = active_out / "rounds.csv"
    if active and rounds.is_file():
        commit = git_commit()
        records = [{**r, "git_commit": commit} for r in read_rows(rounds, ROUND_FIELDS)]
        append_rows(benchmarks / f"{table}_active.csv", records, (*ROUND_FIELDS, "git_commit"))
        print(f"kdzoo bench: recorded {len(records)} rounds in {table}_active.csv")


def _run_active_part(
    spec: dict[str, Any], best: dict[str, str], configs_dir: Path, out: Path, fast: bool
) -> None:
    """A suite's ``active:`` block: the active-learning experiment of ``kdzoo active run`` over
    its ``configs`` with its ``args`` (``{best:RUN}`` filled in), written to ``<out>``
    (``rounds.csv``, ``selected.csv``, ``active.md``, ``active.png``); ``seeds`` in the block
    override the config's (the curves average several, so the bench's ``--seed`` is not used)."""
    from kdzoo.active.loop import run_active

    overrides = [_fill_checkpoints(arg, best) for arg in spec.get("args", [])]
    run_active(
        [configs_dir / config for config in spec["configs"]],
        out,
        seeds=spec.get("seeds"),
        fast=fast,
        overrides=overrides,
    )


def _prepare_corruptions(spec: dict[str, Any] | None, fast: bool, out: Path) -> list[str]:
    """Generate the suite's corruption set (``corruptions: {dataset: FashionMNIST}``) where
    ``CorruptionStream`` looks for it, unless it is there; ``--fast`` writes a 200-image set under
    ``<out>/data`` instead (never into the shared cache) and points the test runs at it."""
    if not spec:
        return []
    from kdzoo.corruptions.__main__ import main as make_corruptions
    from kdzoo.datamodules import CorruptionStream
    from kdzoo.datamodules.base import DatasetNotFoundError

    name = spec.get("name", f"{spec['dataset']}-C")
    if fast:
        root = out / "data"
        if not (root / name).is_dir():
            make_corruptions([spec["dataset"], "--out", str(root), "--num", "200"])
        return [f"--data.init_args.root={root}"]
    try:
        CorruptionStream(dataset=name).find_root()
    except DatasetNotFoundError:
        root = Path(os.environ.get("KDZOO_DATA") or Path.home() / ".cache/kdzoo/data")
        print(f"kdzoo bench: writing {root / name} (one time, about a minute)")
        make_corruptions([spec["dataset"], "--out", str(root)])
    return []


def _rows(
    run: dict[str, Any],
    cli: Any,
    metrics: dict[str, float],
    seed: int,
    start: float,
    metric: str,
) -> list[dict[str, Any]]:
    """The run's result rows: one per ``test/*`` metric it logged, then its ``also_report``
    rows. Student and teacher are what the model says (``result_names()``); the paper's numbers
    are the config's ``paper`` mapping, overridden by the suite run's own ``paper``."""
    config = cli.config.get(cli.subcommand, {})
    paper = {**_as_dict(config.get("paper")), **_as_dict(run.get("paper"))}
    names = cli.model.result_names()
    common = {
        "run": run["name"],
        "method": type(cli.model).__name__,
        "student": names["student"],
        "teacher": names["teacher"],
        "dataset": type(cli.datamodule).__name__,
        "seed": seed,
        "epochs": cli.trainer.current_epoch,
        "wall_clock_s": round(time.perf_counter() - start, 1),
        "config": str(Path(cli.trainer.log_dir) / "config.yaml"),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rows = metric_rows(common, metrics, paper)
    return rows + _also_reported(run, common, metrics, metric)


def _also_reported(
    run: dict[str, Any], common: dict[str, Any], metrics: dict[str, float], metric: str
) -> list[dict[str, Any]]:
    """Extra rows for further metrics the run logged, ``also_report: {ROW_NAME: LOGGED_KEY}``
    (e.g. a label-assisted teacher's ``test/miou_no_label``), under the suite's metric so the
    suite's table shows them as runs of their own."""
    extra = []
    for name, key in (run.get("also_report") or {}).items():
        if key not in metrics:
            raise SystemExit(f"error: run {run['name']!r} did not log {key!r} (also_report)")
        value = in_percent(key.removeprefix("test/"), float(metrics[key]))
        extra.append({**common, "run": name, "metric": metric, "value": value, "paper": ""})
    return extra


def _as_dict(value: Any) -> dict[str, Any]:
    """A ``paper`` mapping from YAML or a jsonargparse Namespace; ``{}`` for none."""
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise SystemExit(f"error: paper must map metric names to numbers, got {value!r}")
    return dict(value)


def _fill_checkpoints(arg: str, best: dict[str, str]) -> str:
    """Replace each ``{best:RUN}`` in a run argument by the best checkpoint of earlier run RUN."""
    for name, path in best.items():
        arg = arg.replace(f"{{best:{name}}}", path)
    if "{best:" in arg:
        raise SystemExit(f"error: {arg!r} names a run that has not run before it")
    return arg


def git_commit() -> str:
    """The source checkout's commit, ``-dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty.strip() else "")


def render_readme_tables(
    readme: str, benchmarks_dir: Path, configs_dir: Path
) -> tuple[str, list[str]]:
    """``readme`` with every ``<!-- kdzoo:table SUITE -->`` block rendered from
    ``benchmarks_dir``, and the names of the blocks whose content that changed."""
    changed: list[str] = []
    if len(TABLE_OPENER.findall(readme)) != len(TABLE_BLOCK.findall(readme)):
        raise SystemExit(
            "error: every `<!-- kdzoo:table SUITE -->` line needs a `<!-- /kdzoo:table -->` "
            "below it"
        )

    def render(match: re.Match[str]) -> str:
        name = match.group(2)
        body = "\n" + render_suite_table(name, benchmarks_dir, configs_dir) + "\n"
        if body != match.group(3):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return TABLE_BLOCK.sub(render, readme), changed


def render_suite_table(name: str, benchmarks_dir: Path, configs_dir: Path) -> str:
    """The Markdown table suite ``name``'s ``table:`` block declares, from ``benchmarks_dir``."""
    spec = table_spec(load_suite(name, configs_dir))
    path = Path(benchmarks_dir) / spec.get("csv", f"{name}.csv")
    if not path.is_file():
        raise SystemExit(f"error: table {name!r} is rendered from {path}, which does not exist")
    try:
        if spec.get("pivot"):  # any CSV, e.g. the active part's rounds
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = read_rows(path)
        # The students' costs, measured apart by tools/bench_cost.py (columns params, macs, ...).
        cost = read_cost(Path(benchmarks_dir) / f"{name}_cost.csv")
        return render_spec(spec, rows, cost=cost)
    except (KeyError, ValueError) as error:  # a wrong table block or results file
        raise SystemExit(f"error: table {name!r} of configs/bench/{name}.yaml: {error}") from None


def tables(readme: Path, benchmarks_dir: Path, configs_dir: Path, *, check: bool = False) -> int:
    """``kdzoo bench tables``: rewrite ``readme``'s tables (or with ``check`` only compare);
    the exit status."""
    text = readme.read_text()
    rendered, changed = render_readme_tables(text, benchmarks_dir, configs_dir)
    count = len(TABLE_BLOCK.findall(text))
    if check:
        if changed:
            print(
                f"error: {readme} differs from the tables rendered from {benchmarks_dir}: "
                f"{', '.join(changed)} (run `kdzoo bench tables` to rewrite them)",
                file=sys.stderr,
            )
            return 1
        print(f"kdzoo bench tables: {readme} matches {benchmarks_dir} ({count} tables)")
        return 0
    if rendered != text:
        readme.write_text(rendered)
    print(f"kdzoo bench tables: rewrote {', '.join(changed) or 'nothing'} in {readme}")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kdzoo bench", description="Run benchmark suites; render the README's result tables."
    )
    subcommands = parser.add_subcommands()
    run = ArgumentParser(description="Train and test every run of a suite; append CSV rows.")
    run.add_argument("suite", type=str, help="suite name: configs/bench/<suite>.yaml")
    run.add_argument("--fast", action="store_true", help="the suite's minute-long preset")
    run.add_argument("--out", type=Path, default=Path("results"), help="results directory")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--download", action="store_true", help="let datamodules download missing datasets"
    )
    run.add_argument(
        "--configs_dir",
        type=Path | None,
        default=None,
        help="configs root (default: ./configs or the source checkout's)",
    )
    run.add_argument(
        "--record",
        action="store_true",
        help="also append the rows to the committed benchmarks/<suite>.csv",
    )
    run.add_argument(
        "--benchmarks_dir",
        type=Path | None,
        default=None,
        help="where --record appends (default: the source checkout's benchmarks/)",
    )
    run.add_argument(
        "--teacher_cache",
        type=bool | None,
        default=None,
        help="students of a suite with teacher_cache: train from one teacher cache per teacher "
        "(true) or from the live teacher (false); default: the suite's setting",
    )
    subcommands.add_subcommand("run", run, help=run.description)
    listing = ArgumentParser(description="List the suites.")
    listing.add_argument("--configs_dir", type=Path | None, default=None)
    subcommands.add_subcommand("list", listing, help=listing.description)
    tables_parser = ArgumentParser(
        description="Render the README's result tables from benchmarks/*.csv, in place."
    )
    tables_parser.add_argument(
        "--check", action="store_true", help="only compare; fail naming the tables that differ"
    )
    tables_parser.add_argument(
        "--readme", type=Path, default=SOURCE_ROOT / "README.md", help="the file to render into"
    )
    tables_parser.add_argument(
        "--benchmarks_dir",
        type=Path,
        default=SOURCE_ROOT / "benchmarks",
        help="the committed results the tables are rendered from",
    )
    tables_parser.add_argument(
        "--configs_dir",
        type=Path | None,
        default=None,
        help="configs root with the suites' table: blocks (default: ./configs or the checkout's)",
    )
    subcommands.add_subcommand("tables", tables_parser, help=tables_parser.description)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    cfg = build_parser().parse_args(list(argv) if argv is not None else None)
    if cfg.subcommand == "list":
        root = cfg.list.configs_dir or default_configs_dir()
        for path in sorted((root / "bench").glob("*.yaml")):
            suite = yaml.safe_load(path.read_text())
            print(f"{path.stem:<12} {suite.get('description', '')}")
        return
    if cfg.subcommand == "tables":
        args = cfg.tables
        configs_dir = args.configs_dir or default_configs_dir()
        sys.exit(tables(args.readme, args.benchmarks_dir, configs_dir, check=args.check))
    args = cfg.run
    run_suite(
        args.suite,
        fast=args.fast,
        out=args.out,
        seed=args.seed,
        download=args.download,
        configs_dir=args.configs_dir,
        record=args.record,
        benchmarks_dir=args.benchmarks_dir,
        teacher_cache=args.teacher_cache,
    )
