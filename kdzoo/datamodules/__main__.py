"""``python -m kdzoo.datamodules NAME [--download] [--root DIR]``: make sure a dataset is present.

Prints where the data was found. With ``--download`` a missing dataset is downloaded first (into
``--root``, ``$KDZOO_DATA/<subdir>`` or ``~/.cache/kdzoo/data/<subdir>``); nothing is downloaded
when the data is already where kdzoo looks. Used by the README's set-up commands.
"""

from __future__ import annotations

import argparse
import sys

import kdzoo.datamodules as datamodules
from kdzoo.datamodules.base import DatasetNotFoundError, ImageClassificationDataModule


def main(argv: list[str] | None = None) -> None:
    names = sorted(
        name
        for name in datamodules.__all__
        if isinstance(getattr(datamodules, name), type)
        and issubclass(getattr(datamodules, name), ImageClassificationDataModule)
        and getattr(datamodules, name) is not ImageClassificationDataModule
    )
    parser = argparse.ArgumentParser(prog="python -m kdzoo.datamodules", description=__doc__)
    parser.add_argument("name", choices=names)
    parser.add_argument("--root", default=None, help="dataset directory (default: search)")
    parser.add_argument("--download", action="store_true", help="download the data if missing")
    args = parser.parse_args(argv)
    datamodule = getattr(datamodules, args.name)(root=args.root, download=args.download)
    try:
        datamodule.prepare_data()
        print(f"{args.name}: {datamodule.find_root()}")
    except DatasetNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
