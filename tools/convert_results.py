"""Convert a results CSV written by kdzoo before the long format into the long format.

Before the long format, ``kdzoo bench run`` wrote one row per run with a column per metric
(``top1``, ``mean_error``, ``miou``, ``paper_top1``, ``paper_miou``). This writes the long format
of :mod:`kdzoo.results`: one row per metric. Where a row's run directory is still there (the
``config`` column points into it), every ``test/*`` metric of its ``metrics.csv`` is converted,
scaled as ``kdzoo bench`` scales it, i.e. the rows a run of today's kdzoo writes (a row's wide
metric must agree with its log, else the conversion stops); otherwise, and for ``also_report``
rows, the wide metric columns are converted alone. An active-learning ``rounds.csv`` (no commit
column) becomes ``benchmarks/<suite>_active.csv`` with ``--git_commit``.

python tools/convert_results.py OLD.csv NEW.csv            # NEW.csv must not exist
python tools/convert_results.py OLD.csv NEW.csv --no-logs  # the CSV's own columns only
python tools/convert_results.py out/active-quick_active/rounds.csv NEW.csv --git_commit SHA
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdzoo.active.report import ROUND_FIELDS
from kdzoo.results import RESULT_FIELDS, WIDE_METRIC_FIELDS, append_rows, in_percent

# The wide format's metric columns: name -> (scaled x100 by kdzoo then, paper column).
WIDE = {"top1": "paper_top1", "mean_error": "", "miou": "paper_miou"}
COMMON = [f for f in RESULT_FIELDS if f not in ("metric", "value", "paper")]


def convert_rows(rows: list[Mapping[str, str]], *, logs: bool = True) -> list[dict[str, Any]]:
    """Long-format rows for the wide-format ``rows`` (see the module docstring; a relative
    ``config`` path is relative to the current directory, as ``kdzoo bench`` wrote it)."""
    out = []
    for row in rows:
        common = {k: row.get(k, "") for k in COMMON}
        wide = {m: float(row[m]) for m in WIDE_METRIC_FIELDS if row.get(m, "") != ""}
        paper = {m: row[p] for m, p in WIDE.items() if p and row.get(p, "") != ""}
        logged = _logged_metrics(row) if logs else None
        if logged is None:
            for metric, value in wide.items():
                value_row = {"metric": metric, "value": value, "paper": paper.get(metric, "")}
                out.append({**common, **value_row})
            continue
        converted = {}
        for key in sorted(logged):
            metric = key.removeprefix("test/")
            converted[metric] = in_percent(metric, logged[key])
        for metric, value in wide.items():
            if metric not in converted or not math.isclose(converted[metric], value, abs_tol=1e-3):
                raise SystemExit(
                    f"error: run {row['run']!r}: {metric} = {value} in the CSV but "
                    f"{converted.get(metric)} in its log; convert with --no-logs"
                )
        for metric, value in converted.items():
            value_row = {"metric": metric, "value": value, "paper": paper.get(metric, "")}
            out.append({**common, **value_row})
    return out


def _logged_metrics(row: Mapping[str, str]) -> dict[str, float] | None:
    """The last value of every ``test/*`` column of the run's ``metrics.csv``; ``None`` when it
    is gone or the row is an ``also_report`` row (its run name is not its log's)."""
    if not row.get("config"):
        return None
    run_dir = Path(row["config"]).parent
    metrics_csv = run_dir / "metrics.csv"
    if run_dir.parent.name != row["run"] or not metrics_csv.is_file():
        return None
    logged: dict[str, float] = {}
    with metrics_csv.open(newline="") as f:
        for line in csv.DictReader(f):
            for key, value in line.items():
                if key.startswith("test/") and value not in ("", None):
                    logged[key] = float(value)
    return logged or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="a wide-format results CSV, or a rounds.csv")
    parser.add_argument("new", type=Path, help="the long-format CSV to write (must not exist)")
    parser.add_argument("--no-logs", action="store_true", help="ignore the runs' metrics.csv")
    parser.add_argument("--git_commit", help="the commit of a rounds.csv's runs")
    args = parser.parse_args()
    if args.new.exists():
        raise SystemExit(f"error: {args.new} exists (the converter never rewrites a file)")
    with args.old.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    if tuple(fields) == ROUND_FIELDS:
        if not args.git_commit:
            raise SystemExit("error: a rounds.csv has no commit column: pass --git_commit")
        fields_out = (*ROUND_FIELDS, "git_commit")
        append_rows(args.new, [{**r, "git_commit": args.git_commit} for r in rows], fields_out)
        print(f"{args.new}: {len(rows)} rounds")
        return
    if not set(WIDE_METRIC_FIELDS) & set(fields):
        raise SystemExit(f"error: {args.old} has columns {fields}: not a wide-format results CSV")
    converted = convert_rows(rows, logs=not args.no_logs)
    append_rows(args.new, converted)
    print(f"{args.new}: {len(converted)} rows from {len(rows)}")


if __name__ == "__main__":
    main()
