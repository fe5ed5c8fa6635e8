"""The active-learning results: ``rounds.csv``, ``selected.csv``, ``active.md``, ``active.png``.

``rounds.csv`` has one row per finished round: ``strategy, seed, round, n_labelled, test_top1``
(in %) and ``wall_clock_s``. ``selected.csv`` has one row per image a round's student picked:
``strategy, seed, round, index`` (the image's index in the dataset's official training set) and
its revealed ``label``; the picks of round ``r`` are labelled from round ``r + 1`` on. Both files
are only ever appended to, from the per-run ``state.json`` files, so a row is never written twice
(see :func:`sync_rows`). The table and the plot are rendered from ``rounds.csv``.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ROUND_FIELDS",
    "SELECTED_FIELDS",
    "plot_curves",
    "read_curves",
    "render",
    "render_table",
    "sync_rows",
]

ROUND_FIELDS = ("strategy", "seed", "round", "n_labelled", "test_top1", "wall_clock_s")
SELECTED_FIELDS = ("strategy", "seed", "round", "index", "label")


def sync_rows(out: Path, state: Mapping[str, Any]) -> None:
    """Append the rounds of ``state`` (a ``state.json``) missing from the two CSV files.

    A round's rows are written in one call, after its state was saved, so an interruption leaves
    either all or none of them and a rerun adds exactly what is missing.
    """
    strategy, seed = state["strategy"], state["seed"]
    rounds_path, selected_path = out / "rounds.csv", out / "selected.csv"
    done_rounds = _keys(rounds_path, ROUND_FIELDS)
    done_selected = _keys(selected_path, SELECTED_FIELDS)
    for record in state["rounds"]:
        key = (strategy, str(seed), str(record["round"]))
        if key not in done_rounds:
            row = {"strategy": strategy, "seed": seed, **record}
            _append(rounds_path, ROUND_FIELDS, [row])
        if key not in done_selected and record["selected"]:
            picks = zip(record["selected"], record["labels"], strict=True)
            common = {"strategy": strategy, "seed": seed, "round": record["round"]}
            rows = [{**common, "index": i, "label": y} for i, y in picks]
            _append(selected_path, SELECTED_FIELDS, rows)


def _keys(path: Path, fields: Sequence[str]) -> set[tuple[str, str, str]]:
    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and list(reader.fieldnames) != list(fields):
            raise ValueError(
                f"{path} has columns {reader.fieldnames}, expected {list(fields)}: move it away "
                "or write to another --out directory"
            )
        return {(r["strategy"], r["seed"], r["round"]) for r in reader}


def _append(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    if new:
        writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        f.write(buffer.getvalue())  # one write: all of a round's rows or none


def read_curves(path: Path) -> dict[str, dict[int, list[float]]]:
    """``{strategy: {n_labelled: [test top-1 of every seed]}}`` from ``rounds.csv``."""
    curves: dict[str, dict[int, list[float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            curve = curves.setdefault(row["strategy"], {})
            curve.setdefault(int(row["n_labelled"]), []).append(float(row["test_top1"]))
    return curves


def render_table(curves: Mapping[str, Mapping[int, Sequence[float]]], title: str) -> str:
    """Markdown: one row per strategy, one column per labelled count; mean test top-1 (%) over
    the seeds, ``± sd`` (sample standard deviation) with two or more seeds, and ``(n)`` where
    fewer seeds than the most in the table have reached that count."""
    counts = sorted({n for curve in curves.values() for n in curve})
    most = max((len(v) for curve in curves.values() for v in curve.values()), default=0)
    lines = [f"## {title}", "", "Test top-1 (%) by number of labelled images, mean over seeds.", ""]
    lines.append("| strategy | " + " | ".join(str(n) for n in counts) + " |")
    lines.append("|---|" + "|".join("---" for _ in counts) + "|")
    for strategy, curve in curves.items():
        cells = []
        for n in counts:
            values = curve.get(n, [])
            if not values:
                cells.append("-")
                continue
            cell = f"{statistics.fmean(values):.2f}"
            if len(values) > 1:
                cell += f" ± {statistics.stdev(values):.2f}"
            if len(values) < most:
                cell += f" ({len(values)})"
            cells.append(cell)
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(
    curves: Mapping[str, Mapping[int, Sequence[float]]], path: Path, title: str
) -> None:
    """Accuracy vs labelled images, one line per strategy (mean over seeds, shaded ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, curve in curves.items():
        counts = sorted(curve)
        means = [statistics.fmean(curve[n]) for n in counts]
        sds = [statistics.stdev(curve[n]) if len(curve[n]) > 1 else 0.0 for n in counts]
        (line,) = ax.plot(counts, means, marker="o", markersize=3, label=strategy)
        low = [m - s for m, s in zip(means, sds, strict=True)]
        high = [m + s for m, s in zip(means, sds, strict=True)]
        ax.fill_between(counts, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path, title: str) -> str | None:
    """Write ``active.md`` and ``active.png`` from ``out/rounds.csv``; the Markdown, or ``None``
    when there are no rows yet."""
    rounds = out / "rounds.csv"
    if not rounds.is_file():
        return None
    curves = read_curves(rounds)
    if not curves:
        return None
    markdown = render_table(curves, title)
    (out / "active.md").write_text(markdown)
    plot_curves(curves, out / "active.png", title)
    return markdown
