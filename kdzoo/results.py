"""Result rows (CSV) and what is rendered from them: Markdown tables and PNG bar charts.

Runs append rows; tables and plots are regenerated from the rows, never typed by hand
(``kdzoo bench tables`` renders the README's tables from ``benchmarks/*.csv``;
``tools/render_results.py`` renders any results CSV).

A results CSV is in long format, one metric per row (:data:`RESULT_FIELDS`): ``run, method,
student, teacher, dataset, metric, value, paper, seed, epochs, wall_clock_s, config, git_commit,
finished_at``. A run writes one row per ``test/*`` metric it logged, named without ``test/``, so a
new task adds rows, never a column. ``value`` is what the run logged, with one rule
(:func:`in_percent`): a fraction metric (accuracy or IoU, logged by torchmetrics in [0, 1]; its
name starts with ``top<k>``, ``acc``, ``pixel_acc``, ``iou`` or ``miou``) is written in %, x100;
every other metric is written as logged (losses; test-time adaptation errors, already in %).
``paper`` is the paper's number for that metric where the config declares one. A CSV of the wide
format kdzoo wrote before (a column per metric) is refused with the command that converts it
(``tools/convert_results.py``).

A cost CSV (:data:`COST_FIELDS`, ``benchmarks/<suite>_cost.csv``, written by
``tools/bench_cost.py``, see :mod:`kdzoo.cost`) holds what each run's student costs at inference:
parameters, MACs and CPU throughput. A table declares the cost columns it shows
(:data:`COST_COLUMNS`) and joins them by run name (:func:`read_cost`, ``render_table(cost=...)``);
a pivot table (active learning's rounds) joins them by its line's key, the selection strategy,
whose cost rows are named after it (``render_pivot(cost=...)``).
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "COST_COLUMNS",
    "COST_FIELDS",
    "RESULT_FIELDS",
    "WideFormatError",
    "append_row",
    "append_rows",
    "in_percent",
    "latest_rows",
    "metric_rows",
    "plot_bars",
    "plot_stream",
    "read_cost",
    "read_rows",
    "render_pivot",
    "render_spec",
    "render_table",
    "summarise",
]

RESULT_FIELDS = (
    "run",
    "method",
    "student",
    "teacher",
    "dataset",
    "metric",
    "value",
    "paper",
    "seed",
    "epochs",
    "wall_clock_s",
    "config",
    "git_commit",
    "finished_at",
)
#: The columns of a cost CSV (see :mod:`kdzoo.cost`): per run, the student's parameters and MACs
#: per image (counted), and images/s at batch 1 and 32 in PyTorch eager and onnxruntime
#: (measured, with the thread count, CPU and versions they were measured with).
COST_FIELDS = (
    "run",
    "student",
    "input",
    "params",
    "macs",
    "eager_b1",
    "eager_b32",
    "ort_b1",
    "ort_b32",
    "threads",
    "cpu",
    "torch",
    "onnxruntime",
    "git_commit",
    "measured_at",
)
#: The table columns a cost CSV fills: name -> (header, its fields). Never shown unless declared.
COST_COLUMNS = {
    "params": ("params (M)", ("params",)),
    "macs": ("MACs (M)", ("macs",)),
    "eager": ("img/s b1 / b32 eager", ("eager_b1", "eager_b32")),
    "ort": ("img/s b1 / b32 ORT", ("ort_b1", "ort_b32")),
}
# The metric columns of the wide format (kdzoo before the long format), to recognise such a file.
WIDE_METRIC_FIELDS = ("top1", "mean_error", "miou")
# Fractions in [0, 1] as torchmetrics logs them (top-k accuracy, accuracy, pixel accuracy, IoU).
_PERCENT = re.compile(r"(top\d+|acc|pixel_acc|m?iou)(_.*)?")


class WideFormatError(ValueError):
    """A results CSV in the wide format of kdzoo before the long format."""


def in_percent(metric: str, value: float) -> float:
    """``value`` as a result row holds it: x100 for a fraction metric (see the module docstring),
    as logged otherwise; rounded to 4 decimals."""
    if _PERCENT.fullmatch(metric):
        if not -1e-6 <= value <= 1.0 + 1e-6:
            raise ValueError(f"metric {metric!r} = {value} is not a fraction in [0, 1]")
        value = 100.0 * value
    return round(float(value), 4)


def metric_rows(
    common: Mapping[str, Any], metrics: Mapping[str, float], paper: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One row per ``test/*`` entry of ``metrics`` (sorted by name): ``common`` (run, method,
    seed, ...) plus ``metric`` (the name without ``test/``), ``value`` (:func:`in_percent`) and
    ``paper`` (``paper[metric]`` or empty)."""
    rows = []
    for key in sorted(k for k in metrics if k.startswith("test/")):
        metric = key.removeprefix("test/")
        value = in_percent(metric, float(metrics[key]))
        rows.append({**common, "metric": metric, "value": value, "paper": paper.get(metric, "")})
    return rows


def append_rows(
    path: str | Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str] = RESULT_FIELDS
) -> None:
    """Append ``rows`` to ``path`` in one write (created with a ``fields`` header if new);
    earlier rows are kept. A file with other columns is refused, untouched."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _check_header(path, fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    if new:
        writer.writeheader()
    for row in rows:
        unknown = set(row) - set(fields)
        if unknown:
            raise ValueError(f"result row has unknown fields {sorted(unknown)}")
        writer.writerow({k: _empty_if_none(row.get(k)) for k in fields})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        f.write(buffer.getvalue())


def append_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one result row to ``path`` (see :func:`append_rows`)."""
    append_rows(path, [row])


def read_rows(path: str | Path, fields: Sequence[str] = RESULT_FIELDS) -> list[dict[str, str]]:
    """The rows of a long-format results CSV (a file with the columns ``fields``); a
    wide-format one is a :class:`WideFormatError`."""
    _check_header(Path(path), fields)
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _check_header(path: Path, expected: Sequence[str] = RESULT_FIELDS) -> None:
    with path.open(newline="") as f:
        fields = next(csv.reader(f), [])
    if tuple(fields) == tuple(expected):
        return
    if set(WIDE_METRIC_FIELDS) & set(fields) and "metric" not in fields:
        raise WideFormatError(
            f"{path} is a results file of the wide format (a column per metric) that kdzoo wrote "
            f"before the long format; convert it: python tools/convert_results.py {path} "
            f"NEW.csv (kdzoo never rewrites a results file)"
        )
    raise ValueError(
        f"{path} has columns {fields}, expected {list(expected)}: move it away or "
        "write to another --out directory (kdzoo never rewrites a results file)"
    )


def read_cost(path: str | Path) -> dict[str, dict[str, str]]:
    """The newest row of each run of the cost CSV ``path`` (:data:`COST_FIELDS`), by run name;
    ``{}`` when there is no such file (the table's cost columns are then empty)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {row["run"]: row for row in read_rows(path, COST_FIELDS)}


def latest_rows(
    rows: Sequence[Mapping[str, str]], metric: str | None = None
) -> list[Mapping[str, str]]:
    """The newest row of each (run, seed, metric), only ``metric``'s when given, in the order the
    runs first appear."""
    latest: dict[tuple[str, str, str], Mapping[str, str]] = {}
    for row in rows:
        if metric is None or row["metric"] == metric:
            latest[(row["run"], str(row.get("seed", "")), row["metric"])] = row
    order = list(dict.fromkeys(row["run"] for row in rows))
    return sorted(latest.values(), key=lambda r: order.index(r["run"]))


def summarise(rows: Sequence[Mapping[str, str]], metric: str = "top1") -> list[dict[str, Any]]:
    """One entry per run that logged ``metric``: the newest row of its newest seed (method,
    student, epochs, ...), plus ``value`` as the mean over the newest row of every seed,
    ``sd`` (sample standard deviation, ``""`` for one seed), ``seeds`` ("0,1"), ``n``,
    ``wall_clock_s`` (mean over the seeds) and ``git_commit`` (every commit of those rows)."""
    by_run: dict[str, list[Mapping[str, str]]] = {}
    for row in latest_rows(rows, metric):
        by_run.setdefault(row["run"], []).append(row)
    summary = []
    for run_rows in by_run.values():
        values = [float(r["value"]) for r in run_rows if r.get("value") not in ("", None)]
        times = [float(r["wall_clock_s"]) for r in run_rows if r.get("wall_clock_s")]
        papers = [r["paper"] for r in run_rows if r.get("paper") not in ("", None)]
        entry: dict[str, Any] = dict(run_rows[-1])
        entry.update(
            {
                "value": statistics.fmean(values) if values else "",
                "sd": statistics.stdev(values) if len(values) > 1 else "",
                "seeds": ",".join(str(r.get("seed", "")) for r in run_rows),
                "n": len(values),
                "wall_clock_s": statistics.fmean(times) if times else "",
                "paper": papers[-1] if papers else "",
                "git_commit": ", ".join(
                    dict.fromkeys(_short_commit(r.get("git_commit", "")) for r in run_rows)
                ),
            }
        )
        summary.append(entry)
    return summary


#: The columns of :func:`render_table`, in order (``reference`` and ``paper`` only appear when
#: there is a reference value or a paper number).
DEFAULT_COLUMNS = (
    "run",
    "method",
    "student",
    "teacher",
    "dataset",
    "value",
    "sd",
    "reference",
    "paper",
    "epochs",
    "seeds",
    "time",
    "commit",
)


def render_table(
    rows: Sequence[Mapping[str, str]],
    title: str | None = None,
    reference: str | None = None,
    metric: str = "top1",
    *,
    header: str | None = None,
    columns: Sequence[str] | None = None,
    extra: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
    cost: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A Markdown table, one line per run that logged ``metric``.

    Args:
        rows: long-format result rows.
        title: a ``## title`` line above the table.
        reference: a run name: adds ``vs <reference>``, each run's difference to it.
        metric: the metric shown, averaged over the seeds run (newest row of each seed).
        header: the metric column's header (default ``<metric> (%)`` for a fraction metric,
            else the metric's name).
        columns: which columns, in order, from :data:`DEFAULT_COLUMNS`, :data:`COST_COLUMNS`
            and the names of ``extra`` (default: :data:`DEFAULT_COLUMNS`, then ``extra``'s
            columns after ``sd``).
        extra: more columns, ``header: regex``: the mean of the run's metrics whose names match
            the regex in full (e.g. one pass of a repeated test-time adaptation stream), averaged
            over the seeds.
        notes: ``run: text`` shown in a ``note`` column after ``run``.
        cost: ``run: cost row`` (:func:`read_cost`) filling the cost columns declared in
            ``columns``: parameters and MACs per image in millions, images/s at batch 1 and 32
            as ``b1 / b32``; ``-`` for a run without a cost row.
    """
    extra = dict(extra or {})
    cost = dict(cost or {})
    notes = dict(notes or {})
    summary = summarise(rows, metric)
    reference_value = next(
        (e["value"] for e in summary if e["run"] == reference and e["value"] != ""), None
    )
    if columns is None:
        columns = list(DEFAULT_COLUMNS)
        columns[columns.index("sd") + 1 : columns.index("sd") + 1] = list(extra)
    if notes and "note" not in columns:
        columns = [*columns[:1], "note", *columns[1:]]
    if reference_value is None:
        columns = [c for c in columns if c != "reference"]
    if not any(e["paper"] != "" for e in summary):
        columns = [c for c in columns if c != "paper"]
    known = [*DEFAULT_COLUMNS, *COST_COLUMNS]
    unknown = [c for c in columns if c not in known and c not in extra and c != "note"]
    if unknown:
        raise ValueError(f"unknown table columns {unknown}; known: {known}")
    metric_header = header or (f"{metric} (%)" if _PERCENT.fullmatch(metric) else metric)
    headers = {
        "value": metric_header,
        "reference": f"vs {reference}",
        "paper": "paper",
        "time": "time (s)",
        "commit": "commit",
        **{name: title for name, (title, _) in COST_COLUMNS.items()},
    }
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(headers.get(c, c) for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for entry in summary:
        cells = []
        for column in columns:
            if column == "reference":
                value = "" if entry["value"] == "" else f"{entry['value'] - reference_value:+.2f}"
            elif column == "note":
                value = notes.get(entry["run"], "")
            elif column in extra:
                value = _mean_of_matching(rows, entry["run"], extra[column])
            elif column in COST_COLUMNS:
                cells.append(_cost_cell(column, cost.get(entry["run"], {})))
                continue
            else:
                key = {"time": "wall_clock_s", "commit": "git_commit"}.get(column, column)
                value = entry.get(key, "")
            cells.append(_format(column, value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_of_matching(rows: Sequence[Mapping[str, str]], run: str, pattern: str) -> Any:
    """The mean over seeds of the mean of ``run``'s metrics whose names match ``pattern``."""
    regex = re.compile(pattern)
    per_seed: dict[str, list[float]] = {}
    for row in latest_rows([r for r in rows if r["run"] == run]):
        if regex.fullmatch(row["metric"]) and row["value"] not in ("", None):
            per_seed.setdefault(str(row.get("seed", "")), []).append(float(row["value"]))
    means = [statistics.fmean(values) for values in per_seed.values()]
    return statistics.fmean(means) if means else ""


def _cost_cell(column: str, row: Mapping[str, str]) -> str:
    """A cost column's cell: millions (3 significant digits) for parameters and MACs, whole
    images/s joined by `` / `` for throughput; ``-`` for a missing value."""
    values = [row.get(field, "") for field in COST_COLUMNS[column][1]]
    if all(v in ("", None) for v in values):
        return "-"
    if column in ("params", "macs"):
        return _significant(float(values[0]) / 1e6)
    return " / ".join("-" if v in ("", None) else f"{float(v):.0f}" for v in values)


def _significant(value: float) -> str:
    """3 significant digits, none dropped, without an exponent (0.0781, 3.40, 33.0, 1820)."""
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}".rstrip(".")


def render_pivot(
    rows: Sequence[Mapping[str, str]],
    *,
    index: str,
    columns: str,
    value: str,
    seed: str = "seed",
    header: str = "{}",
    cost_columns: Sequence[str] = (),
    cost: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A Markdown table of ``value`` by ``index`` (lines) and ``columns`` (columns), e.g. test
    top-1 by strategy and labelled count: the mean over ``seed`` (newest row of each (index,
    column, seed)), ``± sd`` with two or more seeds and ``(n)`` where fewer seeds than the most
    in the table reached that cell; then the ``cost_columns`` (:data:`COST_COLUMNS`, the only
    other columns a pivot can show; ``cost`` joined by the line's ``index`` value, e.g. the
    strategy, as :func:`render_table` joins them by run; ``-`` without a cost row), the seeds,
    the time (mean over seeds of the summed ``wall_clock_s``) and the commits of the line's rows.
    ``header`` formats a column's value as its header (e.g. ``"{} labels"``)."""
    not_cost = [c for c in cost_columns if c not in COST_COLUMNS]
    if not_cost:
        raise ValueError(
            f"a pivot table's columns can only be cost columns, not {not_cost}; "
            f"allowed: {list(COST_COLUMNS)}"
        )
    cost = dict(cost or {})
    latest: dict[tuple[str, str, str], Mapping[str, str]] = {}
    for row in rows:
        latest[(row[index], row[columns], str(row.get(seed, "")))] = row
    keys = list(dict.fromkeys(row[index] for row in rows))
    column_values = sorted({c for _, c, _ in latest}, key=_numeric_first)
    cells: dict[tuple[str, str], list[float]] = {}
    for (line, column, _), row in latest.items():
        cells.setdefault((line, column), []).append(float(row[value]))
    most = max((len(v) for v in cells.values()), default=0)
    has_time = any(r.get("wall_clock_s") not in ("", None) for r in rows)
    has_commit = any(r.get("git_commit") not in ("", None) for r in rows)
    head = [index, *(header.format(c) for c in column_values)]
    head += [COST_COLUMNS[c][0] for c in cost_columns] + ["seeds"]
    head += ["time (s)"] * has_time + ["commit"] * has_commit
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for line in keys:
        out = [_pivot_cell(cells.get((line, column), []), most) for column in column_values]
        out += [_cost_cell(column, cost.get(line, {})) for column in cost_columns]
        mine = [row for (k, _, _), row in latest.items() if k == line]
        seeds = list(dict.fromkeys(str(row.get(seed, "")) for row in mine))
        out.append(",".join(seeds))
        if has_time:
            totals: dict[str, float] = {}
            for row in mine:
                s = str(row.get(seed, ""))
                totals[s] = totals.get(s, 0.0) + float(row.get("wall_clock_s") or 0.0)
            out.append(f"{statistics.fmean(totals.values()):.0f}")
        if has_commit:
            out.append(", ".join(dict.fromkeys(_short_commit(r["git_commit"]) for r in mine)))
        lines.append(f"| {line} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _pivot_cell(values: Sequence[float], most: int) -> str:
    """A pivot cell: the mean of its seeds' values, ``± sd`` with two or more, ``(n)`` where
    fewer seeds than ``most`` (the most of any cell) reached it; ``-`` for none."""
    if not values:
        return "-"
    cell = f"{statistics.fmean(values):.2f}"
    if len(values) > 1:
        cell += f" ± {statistics.stdev(values):.2f}"
    if len(values) < most:
        cell += f" ({len(values)})"
    return cell


def render_spec(
    spec: Mapping[str, Any],
    rows: Sequence[Mapping[str, str]],
    cost: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """The table a suite's ``table:`` block declares (see :mod:`kdzoo.bench`), from ``rows``,
    its cost columns (if it declares any) from ``cost`` (:func:`read_cost`). With ``pivot``,
    ``columns`` may only name cost columns, added to each line of the pivot."""
    known = {"csv", "metric", "reference", "header", "columns", "extra", "notes", "pivot"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown table keys {sorted(unknown)}; known: {sorted(known)}")
    if spec.get("pivot"):
        pivot = dict(spec["pivot"])
        return render_pivot(
            rows,
            index=pivot["rows"],
            columns=pivot["columns"],
            value=pivot["value"],
            header=pivot.get("header", "{}"),
            cost_columns=spec.get("columns") or (),
            cost=cost,
        )
    return render_table(
        rows,
        reference=spec.get("reference"),
        metric=spec.get("metric", "top1"),
        header=spec.get("header"),
        columns=spec.get("columns"),
        extra=spec.get("extra"),
        notes=spec.get("notes"),
        cost=cost,
    )


def plot_bars(
    rows: Sequence[Mapping[str, str]], path: str | Path, title: str = "", metric: str = "top1"
) -> None:
    """A bar chart of ``metric`` per run (mean over its seeds, see :func:`summarise`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarise(rows, metric) if r["value"] != ""]
    names = [r["run"] for r in rows]
    values = [float(r["value"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    bars = ax.bar(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    if _PERCENT.fullmatch(metric):
        low = min(values) if values else 0.0
        ax.set_ylim(max(0.0, low - 10.0), 100.0)
    else:  # errors and losses: lower is better, the axis starts at 0
        ax.set_ylim(0.0, max(values, default=0.0) * 1.15 + 1e-6)
    ax.set_ylabel(f"{metric} (%)" if _PERCENT.fullmatch(metric) else metric)
    ax.set_title(title)
    if any(len(name) > 12 for name in names):  # long run names would overlap
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _format(column: str, value: Any) -> str:
    if value in ("", None):
        return "" if column == "note" else "-"
    if column == "time":
        return f"{float(value):.0f}"
    if column in ("value", "sd", "paper") or isinstance(value, float):
        return f"{float(value):.2f}"
    return str(value)


def _short_commit(commit: str) -> str:
    """The first 10 hex digits, keeping a ``-dirty`` mark."""
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")


def _numeric_first(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _empty_if_none(value: Any) -> Any:
    return "" if value is None else value


def plot_stream(streams: Mapping[str, str | Path], path: str | Path, title: str = "") -> None:
    """Error along a test-time adaptation stream, one line per run: the error (%) of each batch
    of every ``tta_stream.csv`` (as written by :class:`~kdzoo.methods.tta.TTAModule`), smoothed
    over 5 batches, with the domain boundaries of the first run marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    boundaries: list[tuple[int, str]] = []
    for label, csv_path in streams.items():
        with Path(csv_path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        errors = [100.0 * int(r["errors"]) / max(1, int(r["images"])) for r in rows]
        smooth = [statistics.fmean(errors[max(0, i - 4) : i + 1]) for i in range(len(errors))]
        ax.plot(range(len(smooth)), smooth, label=label, linewidth=1.2)
        if not boundaries:
            boundaries = [
                (i, r["name"])
                for i, r in enumerate(rows)
                if i == 0 or r["domain"] != rows[i - 1]["domain"]
            ]
    for index, name in boundaries:
        ax.axvline(index, color="0.85", linewidth=0.6, zorder=0)
        ax.text(index, 1.0, name, rotation=90, fontsize=6, va="top", ha="left",
                transform=ax.get_xaxis_transform(), color="0.4")  # fmt: skip
    ax.set_xlabel("test batch (stream order)")
    ax.set_ylabel("error (%), 5-batch mean")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
