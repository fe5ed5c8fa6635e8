"""Result rows (CSV) and what is rendered from them: Markdown tables and PNG bar charts.

Runs append rows; tables and plots are regenerated from the rows, never typed by hand
(``tools/render_results.py`` does it for any results CSV).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULT_FIELDS",
    "append_row",
    "latest_rows",
    "plot_bars",
    "read_rows",
    "render_table",
    "summarise",
]

RESULT_FIELDS = (
    "run",
    "method",
    "student",
    "teacher",
    "dataset",
    "top1",
    "mean_error",
    "miou",
    "paper_top1",
    "paper_miou",
    "seed",
    "epochs",
    "wall_clock_s",
    "config",
    "git_commit",
    "finished_at",
)


def append_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row to ``path`` (created with a header if new). Earlier rows are kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    fields = list(RESULT_FIELDS)
    if not new:
        with path.open(newline="") as f:
            fields = next(csv.reader(f), [])
        # A file written by an older kdzoo (fewer columns) still takes rows that leave the
        # newer columns empty.
        missing = [k for k in RESULT_FIELDS if k not in fields and row.get(k, "") != ""]
        if not set(fields) <= set(RESULT_FIELDS) or missing:
            raise ValueError(
                f"{path} has columns {fields}, expected {list(RESULT_FIELDS)}: move it away or "
                "write to another --out directory (kdzoo never rewrites a results file)"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The newest row of each (run, seed), in the order the runs first appear."""
    latest: dict[tuple[str, str], Mapping[str, str]] = {}
    for row in rows:
        latest[(row["run"], str(row.get("seed", "")))] = row
    order = list(dict.fromkeys(row["run"] for row in rows))
    return sorted(latest.values(), key=lambda r: order.index(r["run"]))


def summarise(rows: Sequence[Mapping[str, str]], metric: str = "top1") -> list[dict[str, Any]]:
    """One entry per run: the newest row of its newest seed, plus ``metric`` as the mean over the
    newest row of every seed, ``<metric>_sd`` (sample standard deviation, ``""`` for one seed),
    ``seeds`` ("0,1") and ``n``."""
    by_run: dict[str, list[Mapping[str, str]]] = {}
    for row in latest_rows(rows):
        by_run.setdefault(row["run"], []).append(row)
    summary = []
    for run_rows in by_run.values():
        values = [float(r[metric]) for r in run_rows if r.get(metric) not in ("", None)]
        entry = dict(run_rows[-1])
        entry.update(
            {
                metric: statistics.fmean(values) if values else "",
                f"{metric}_sd": statistics.stdev(values) if len(values) > 1 else "",
                "seeds": ",".join(str(r.get("seed", "")) for r in run_rows),
                "n": len(values),
            }
        )
        summary.append(entry)
    return summary


METRIC_HEADERS = {"top1": "top-1 (%)", "mean_error": "mean error (%)", "miou": "mIoU (%)"}
# Metrics where lower is better (the bar chart's axis starts at 0 for them).
LOWER_IS_BETTER = ("mean_error",)


def render_table(
    rows: Sequence[Mapping[str, str]],
    title: str | None = None,
    reference: str | None = None,
    metric: str = "top1",
) -> str:
    """A Markdown table, one line per run: ``metric`` (``top1``, or ``mean_error`` for test-time
    adaptation) averaged over the seeds run (newest row of each), its standard deviation, and with
    ``reference`` (a run name) the difference to that run."""
    summary = summarise(rows, metric)
    reference_value = next(
        (e[metric] for e in summary if e["run"] == reference and e[metric] != ""), None
    )
    columns = [
        ("run", "run"),
        ("method", "method"),
        ("student", "model" if metric == "mean_error" else "student"),
        ("teacher", "teacher"),
        ("dataset", "dataset"),
        (metric, METRIC_HEADERS.get(metric, metric)),
        (f"{metric}_sd", "sd"),
        *([("delta", f"vs {reference}")] if reference_value is not None else []),
        *([("paper_top1", "paper top-1 (%)")] if metric == "top1" else []),
        *([("paper_miou", "paper mIoU (%)")] if metric == "miou" else []),
        ("epochs", "epochs"),
        ("seeds", "seeds"),
        ("wall_clock_s", "time (s)"),
        ("git_commit", "commit"),
    ]
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header for _, header in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for entry in summary:
        if reference_value is not None and entry[metric] != "":
            entry["delta"] = f"{entry[metric] - reference_value:+.2f}"
        cells = [_format(key, entry.get(key, "")) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_bars(
    rows: Sequence[Mapping[str, str]], path: str | Path, title: str = "", metric: str = "top1"
) -> None:
    """A bar chart of ``metric`` per run (mean over its seeds, see :func:`summarise`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarise(rows, metric) if r[metric] != ""]
    names = [r["run"] for r in rows]
    values = [float(r[metric]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    bars = ax.bar(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    if metric not in LOWER_IS_BETTER:
        low = min(values) if values else 0.0
        ax.set_ylim(max(0.0, low - 10.0), 100.0)
    else:
        ax.set_ylim(0.0, min(100.0, max(values, default=0.0) + 10.0))
    ax.set_ylabel(METRIC_HEADERS.get(metric, metric))
    ax.set_title(title)
    if any(len(name) > 12 for name in names):  # long run names would overlap
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _format(key: str, value: str) -> str:
    if value in ("", None):
        return "-"
    if key.removesuffix("_sd") in ("top1", "paper_top1", "mean_error", "miou", "paper_miou"):
        return f"{float(value):.2f}"
    if key == "wall_clock_s":
        return f"{float(value):.0f}"
    if key == "git_commit":
        return value[:10]
    return str(value)


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
        rows = read_rows(csv_path)
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
