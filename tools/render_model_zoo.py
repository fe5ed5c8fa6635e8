"""Regenerate the model-zoo table of checkpoints/README.md from checkpoints/manifest.yaml.

python tools/render_model_zoo.py            # rewrites the table between the markers
python tools/render_model_zoo.py --check    # exit 1 if the README is out of date (for CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdzoo.hub.cli import manifest_table

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- model-zoo:begin -->", "<!-- model-zoo:end -->"


def render(readme: str, table: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "checkpoints/manifest.yaml")
    parser.add_argument("--readme", type=Path, default=ROOT / "checkpoints/README.md")
    parser.add_argument("--check", action="store_true", help="only check, do not write")
    args = parser.parse_args()
    current = args.readme.read_text()
    updated = render(current, manifest_table(args.manifest))
    if args.check:
        if updated != current:
            print(f"{args.readme} is out of date: run python {Path(__file__).name}")
            sys.exit(1)
        return
    args.readme.write_text(updated)


if __name__ == "__main__":
    main()
