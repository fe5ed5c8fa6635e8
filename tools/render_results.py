"""Re-render the Markdown table and PNG bar chart of a results CSV without re-running anything.

python tools/render_results.py results/quick.csv   # writes results/quick.md and quick.png
python tools/render_results.py results/seg-quick_fast.csv --metric miou --reference baseline

The table is the one the suite's ``table:`` block declares (the suite named by the file, without
``_fast``, from ``configs/bench/``); ``--metric`` and ``--reference`` override it. The README's
tables are rendered from ``benchmarks/`` by ``kdzoo bench tables``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from kdzoo.bench import default_configs_dir, runs_table_spec
from kdzoo.results import plot_bars, read_rows, render_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a results CSV written by `kdzoo bench run`")
    parser.add_argument("--metric", help="the metric shown (default: the suite's, else top1)")
    parser.add_argument("--reference", help="run name the other runs are compared with")
    parser.add_argument("--configs_dir", type=Path, default=None)
    args = parser.parse_args()
    suite_file = (args.configs_dir or default_configs_dir()) / "bench"
    suite_file /= f"{args.csv.stem.removesuffix('_fast')}.yaml"
    suite = yaml.safe_load(suite_file.read_text()) if suite_file.is_file() else {"runs": []}
    spec = runs_table_spec(suite)
    if args.metric and args.metric != spec.get("metric"):  # the suite's layout is for its metric
        spec = {"metric": args.metric, "reference": spec.get("reference")}
    if args.reference:
        spec["reference"] = args.reference
    rows = read_rows(args.csv)
    table = f"## kdzoo bench {args.csv.stem}\n\n" + render_spec(spec, rows)
    args.csv.with_suffix(".md").write_text(table)
    metric = spec["metric"]
    plot_bars(rows, args.csv.with_suffix(".png"), title=f"{args.csv.stem}: {metric}", metric=metric)
    print(table)


if __name__ == "__main__":
    main()
