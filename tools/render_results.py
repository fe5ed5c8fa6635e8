"""Re-render the Markdown table and PNG bar chart of a results CSV without re-running anything.

python tools/render_results.py results/quick.csv   # writes results/quick.md and quick.png
python tools/render_results.py results/quick.csv --reference kd   # adds a "vs kd" column
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdzoo.results import plot_bars, read_rows, render_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a results CSV written by `kdzoo bench run`")
    parser.add_argument("--reference", help="run name the other runs are compared with")
    args = parser.parse_args()
    rows = read_rows(args.csv)
    table = render_table(rows, title=f"kdzoo bench {args.csv.stem}", reference=args.reference)
    args.csv.with_suffix(".md").write_text(table)
    plot_bars(rows, args.csv.with_suffix(".png"), title=f"kdzoo bench {args.csv.stem}: test top-1")
    print(table)


if __name__ == "__main__":
    main()
