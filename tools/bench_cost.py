"""Measure what the students of a finished benchmark suite cost: parameters, MACs, CPU img/s.

For every run of a suite's results CSV (``<out>/<suite>.csv`` as ``kdzoo bench run SUITE --out
OUT`` wrote it, or ``--results benchmarks/<suite>.csv``, whose ``config`` column points at the
run folders), the run's deployed network is rebuilt from its best checkpoint (a test-only run:
from its logged config) and measured once per distinct network and input (see
:mod:`kdzoo.cost`): parameters, MACs per image (torch's FlopCounterMode, FLOPs / 2), and images/s
of inference at batch 1 and 32 in PyTorch eager and onnxruntime (those columns stay empty, with a
warning, without onnx, onnxscript and onnxruntime: ``pip install 'kdzoo[onnx]'``). One row per
run is appended to ``benchmarks/<suite>_cost.csv`` (earlier rows kept; a table shows the newest
row of each run), which a suite's table joins when it declares the cost columns ``params``,
``macs``, ``eager``, ``ort``.

A suite with an active-learning part also gets one row per selection strategy, named after the
strategy (the rows of its pivot table), from the active results directory (``--active DIR``,
default ``<out>/<suite>_active`` when it exists): each strategy's newest round, rebuilt from its
logged config with random weights (rounds keep no checkpoints; weights do not change the cost).

Run it on a quiet machine (nothing else running), with a fixed thread count (the committed
``benchmarks/*_cost.csv`` use 2, this machine's cores):

    python tools/bench_cost.py quick --out results --threads 2
    python tools/bench_cost.py quick --results benchmarks/quick.csv --threads 2
    python tools/bench_cost.py active-quick --results benchmarks/active-quick.csv \\
        --active results/active-quick_active --threads 2
    python tools/bench_cost.py quick_fast --out results --reps 1 --warmup 0 --cost_csv /tmp/c.csv
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from kdzoo.bench import git_commit
from kdzoo.cost import RUNTIMES, CostError
from kdzoo.cost_suite import active_log_dirs, active_strategies, measure_log_dirs, suite_log_dirs
from kdzoo.results import COST_FIELDS, append_rows, read_rows

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # What could not be measured, one line each (a column left empty, random weights).
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = args.results or args.out / f"{args.suite}.csv"
    if not results.is_file():
        raise SystemExit(f"error: no {results}: run the suite first (kdzoo bench run)")
    runs = list(dict.fromkeys(row["run"] for row in read_rows(results)))
    active = args.active or _default_active(args.out, args.suite)
    strategies = _strategies(active, runs) if active is not None else []
    start = time.perf_counter()
    found = suite_log_dirs(results, args.out / "runs" / args.suite)
    found += active_log_dirs(active) if active is not None else []
    options = {"warmup": args.warmup, "reps": args.reps, "runtimes": args.runtimes}
    rows = measure_log_dirs(found, **options, git_commit=git_commit())
    path = args.cost_csv or SOURCE_ROOT / "benchmarks" / f"{args.suite}_cost.csv"
    append_rows(path, rows, COST_FIELDS)
    elapsed = time.perf_counter() - start
    what = f"{len(runs)} runs" + (f", {len(strategies)} strategies" if active is not None else "")
    print(f"{path}: {len(rows)} rows ({what}), {torch.get_num_threads()} threads, {elapsed:.0f} s")
    measured = {row["run"] for row in rows}
    skipped = [name for name in [*runs, *strategies] if name not in measured]
    if skipped:
        print(f"error: not measured: {', '.join(skipped)}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", help="the results table: <suite>, or <suite>_fast for --fast")
    parser.add_argument("--out", type=Path, default=Path("results"), help="the results directory")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the results CSV (default: <out>/<suite>.csv), e.g. benchmarks/<suite>.csv",
    )
    parser.add_argument(
        "--active",
        type=Path,
        default=None,
        help="an active-learning results dir whose students are measured too, one row per "
        "strategy (default: <out>/<suite>_active when it exists)",
    )
    parser.add_argument(
        "--cost_csv",
        type=Path,
        default=None,
        help="where to append the rows (default: benchmarks/<suite>_cost.csv of the checkout)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--warmup", type=int, default=10, help="untimed passes per measurement")
    parser.add_argument("--reps", type=int, default=50, help="timed passes; the median is kept")
    parser.add_argument(
        "--runtimes", nargs="+", choices=list(RUNTIMES), default=list(RUNTIMES), help="to time"
    )
    return parser


def _default_active(out: Path, suite: str) -> Path | None:
    """``<out>/<suite>_active`` where ``kdzoo bench run`` writes a suite's active part, if it
    is there (a suite without one has none)."""
    active = out / f"{suite}_active"
    return active if active.is_dir() else None


def _strategies(active: Path, runs: list[str]) -> list[str]:
    """The strategies of the active results directory ``active``; refused before anything is
    measured when it is not one, or when a strategy has a run's name (the cost rows of both
    would be one table key)."""
    try:
        strategies = active_strategies(active)
    except CostError as err:
        raise SystemExit(f"error: --active: {err}") from None
    clash = [s for s in strategies if s in runs]
    if clash:
        raise SystemExit(
            f"error: strategies {clash} of {active} are also runs of the suite: their cost rows "
            "would share a name; rename the runs"
        )
    return strategies


if __name__ == "__main__":
    sys.exit(main())
