"""``kdzoo bench``: run a benchmark suite of training runs and render its results.

A suite is a YAML file ``configs/bench/<suite>.yaml``: config files shared by every run, a list
of runs (each a list of config files, optional extra CLI arguments, and optionally the earlier
run whose best checkpoint is its teacher), and the overrides of the ``--fast`` preset. In a run's
arguments ``{best:RUN}`` stands for the best checkpoint of the earlier run ``RUN`` (e.g. several
specialist teachers, or a fine-tuned teacher's initial weights). A run with ``command: test``
evaluates without training (test-time adaptation: the model adapts during ``kdzoo test``); a
suite's ``metric`` (``top1``, ``mean_error`` or ``miou``) is what its table and bar chart show,
and runs that write a ``tta_stream.csv`` are drawn together in ``<suite>_stream.png``. ``fast``
may be a dict of presets per command, and a run's ``fast_args`` are added in ``--fast`` mode. A
run's ``also_report: {NAME: LOGGED_KEY}`` adds a row ``NAME`` holding another metric the run
logged (e.g. a label-assisted teacher's mIoU without its label input). Adding a method to a
suite is adding a run to that file. Every run trains with ``kdzoo fit`` (the same
:class:`~kdzoo.lightning_cli.KDCLI`), is evaluated on the test split with its best checkpoint,
and appends one row to ``<out>/<suite>.csv``; ``<suite>.md`` and ``<suite>.png`` are rendered
from the CSV. A suite's ``active:`` block (``configs``, ``args``) then runs an active-learning
experiment (:func:`kdzoo.active.loop.run_active`) into ``<out>/<suite>_active/``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from kdzoo.results import append_row, plot_bars, plot_stream, read_rows, render_table

__all__ = ["load_suite", "main", "run_suite"]


def default_configs_dir() -> Path:
    """``./configs`` when it has suites, else the ``configs/`` of the kdzoo source checkout."""
    local = Path("configs")
    if (local / "bench").is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "configs"


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


def run_suite(
    name: str,
    *,
    fast: bool = False,
    out: Path = Path("results"),
    seed: int = 0,
    download: bool = False,
    configs_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train and test every run of suite ``name``; return the rows it appended."""
    from kdzoo.lightning_cli import KDCLI

    configs_dir = configs_dir or default_configs_dir()
    suite = load_suite(name, configs_dir)
    table = f"{name}_fast" if fast else name
    out = Path(out)
    best: dict[str, str] = {}
    streams: dict[str, Path] = {}
    rows = []
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
        if run.get("teacher"):
            args.append(f"--model.init_args.teacher.weights={best[run['teacher']]}")
        if download and command == "fit":
            args.append("--data.init_args.download=true")
        args += data_args if command == "test" else []
        args += [
            f"--seed_everything={seed}",
            f"--trainer.logger.init_args.save_dir={out / 'runs' / table}",
            f"--trainer.logger.init_args.name={run['name']}",
        ]
        start = time.perf_counter()
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
        rows.append(_row(run, cli, metrics, seed, start))
        append_row(out / f"{table}.csv", rows[-1])
        for extra in _also_reported(run, rows[-1], metrics, metric):
            rows.append(extra)
            append_row(out / f"{table}.csv", extra)
    if suite.get("active"):
        _run_active_part(suite["active"], best, configs_dir, out / f"{table}_active", fast)
    if not rows:
        return rows
    all_rows = read_rows(out / f"{table}.csv")
    title = f"kdzoo bench {name}{' --fast' if fast else ''}"
    markdown = render_table(all_rows, title=title, reference=suite.get("reference"), metric=metric)
    (out / f"{table}.md").write_text(markdown)
    plot_bars(all_rows, out / f"{table}.png", title=f"{title}: {metric}", metric=metric)
    if streams:
        plot_stream(streams, out / f"{table}_stream.png", title=f"{title}: error along the stream")
    print(markdown)
    return rows


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


def _row(
    run: dict[str, Any], cli: Any, metrics: dict[str, float], seed: int, start: float
) -> dict[str, Any]:
    hparams = cli.model.hparams
    source = hparams.get("source") or {}  # test-time adaptation: the adapted source model
    config = cli.config.get(cli.subcommand, {})
    top1 = metrics.get("test/top1")
    mean_error = metrics.get("test/mean_error")
    miou = metrics.get("test/miou")
    return {
        "run": run["name"],
        "method": type(cli.model).__name__,
        "student": _student_name(hparams, source),
        "teacher": _teacher_names(hparams),
        "dataset": type(cli.datamodule).__name__,
        "top1": "" if top1 is None else round(100.0 * float(top1), 4),
        "mean_error": "" if mean_error is None else round(float(mean_error), 4),
        "miou": "" if miou is None else round(100.0 * float(miou), 4),
        "paper_top1": _or_empty(run.get("paper_top1", config.get("paper_top1"))),
        "paper_miou": _or_empty(run.get("paper_miou", config.get("paper_miou"))),
        "seed": seed,
        "epochs": cli.trainer.current_epoch,
        "wall_clock_s": round(time.perf_counter() - start, 1),
        "config": str(Path(cli.trainer.log_dir) / "config.yaml"),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _also_reported(
    run: dict[str, Any], row: dict[str, Any], metrics: dict[str, float], metric: str
) -> list[dict[str, Any]]:
    """Extra rows for further metrics the run logged, ``also_report: {ROW_NAME: LOGGED_KEY}``
    (e.g. a label-assisted teacher's ``test/miou_no_label``), in the suite's metric column."""
    extra = []
    for name, key in (run.get("also_report") or {}).items():
        if key not in metrics:
            raise SystemExit(f"error: run {run['name']!r} did not log {key!r} (also_report)")
        value = float(metrics[key])
        extra.append(
            {
                **row,
                "run": name,
                metric: round(100.0 * value if metric != "mean_error" else value, 4),
            }
        )
    return extra


def _fill_checkpoints(arg: str, best: dict[str, str]) -> str:
    """Replace each ``{best:RUN}`` in a run argument by the best checkpoint of earlier run RUN."""
    for name, path in best.items():
        arg = arg.replace(f"{{best:{name}}}", path)
    if "{best:" in arg:
        raise SystemExit(f"error: {arg!r} names a run that has not run before it")
    return arg


def _teacher_names(hparams: Any) -> str:
    """The teacher's architecture, or the specialists' joined by " + " (KnowledgeConcentration);
    a segmentation teacher as ``backbone/head`` (with ``+label`` for a label-assisted one)."""
    teachers = hparams.get("specialists") or [hparams.get("teacher") or {}]
    names = []
    for teacher in teachers:
        architecture = teacher.get("architecture") or {}
        name = teacher.get("name") or _with_head(architecture.get("backbone", ""), architecture)
        names.append(name + ("+label" if architecture.get("extra_in_chans") else ""))
    return " + ".join(names)


def _student_name(hparams: Any, source: Any) -> str:
    """The trained network: a timm name, ``backbone/head`` (segmentation), or for paired-modality
    methods the encoder of the modality it sees (``name (m1)``) or ``fusion(a+b)``."""
    encoders = hparams.get("encoders")
    if not encoders:
        return _with_head(hparams.get("student", "") or source.get("name", ""), hparams)
    names = [e.get("name") or e.get("kind", "") for e in encoders]
    role = hparams.get("network") or f"m{int(hparams.get('target_modality', 0)) + 1}"
    if role == "fusion":
        return f"fusion({'+'.join(names)})"
    return f"{names[int(role[1]) - 1]} ({role})"


def _with_head(name: str, hparams: Any) -> str:
    """``backbone/head`` for segmentation networks, the plain name otherwise."""
    head = hparams.get("head")
    return f"{name}/{head}" if name and head else name


def _or_empty(value: Any) -> Any:
    return "" if value is None else value


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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="kdzoo bench", description="Run benchmark suites.")
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
    subcommands.add_subcommand("run", run, help=run.description)
    listing = ArgumentParser(description="List the suites.")
    listing.add_argument("--configs_dir", type=Path | None, default=None)
    subcommands.add_subcommand("list", listing, help=listing.description)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    cfg = build_parser().parse_args(list(argv) if argv is not None else None)
    if cfg.subcommand == "list":
        root = cfg.list.configs_dir or default_configs_dir()
        for path in sorted((root / "bench").glob("*.yaml")):
            suite = yaml.safe_load(path.read_text())
            print(f"{path.stem:<12} {suite.get('description', '')}")
        return
    args = cfg.run
    run_suite(
        args.suite,
        fast=args.fast,
        out=args.out,
        seed=args.seed,
        download=args.download,
        configs_dir=args.configs_dir,
    )
