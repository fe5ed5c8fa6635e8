"""``kdzoo active``: run, resume and render active-learning experiments.

``kdzoo active run -c CONFIG --out DIR [--seed S] [--strategies a,b] [--fast] [OVERRIDES]``
runs (or resumes) every strategy and seed of a config (see :func:`kdzoo.active.loop.run_active`);
``OVERRIDES`` are ``kdzoo fit`` arguments with a dotted key, e.g.
``--model.init_args.teacher.weights=teacher.ckpt`` or ``--active.rounds=5``.
``kdzoo active render --out DIR`` redraws ``active.md`` and ``active.png`` from ``rounds.csv``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser

from kdzoo.active.strategies import STRATEGIES

__all__ = ["build_parser", "main"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kdzoo active",
        description="Active learning with knowledge distillation (PCoreSet / ActiveKD).",
    )
    subcommands = parser.add_subcommands()
    run = ArgumentParser(
        description="Run or resume every strategy and seed of a config; further arguments with "
        "a dotted key (--trainer.max_epochs=2, --model.init_args.teacher.weights=PATH, "
        "--active.rounds=5) override the config as in `kdzoo fit`."
    )
    run.add_argument(
        "-c", "--config", type=str, action="append", required=True,
        help="a kdzoo fit config with an `active:` block (repeat to merge several, in order)",
    )  # fmt: skip
    run.add_argument("--out", type=Path, required=True, help="results directory")
    run.add_argument(
        "--seed", "--seeds", dest="seeds", type=str | None, default=None,
        help="seed(s) to run, e.g. 0 or 0,1 (default: the config's active.seeds)",
    )  # fmt: skip
    run.add_argument(
        "--strategies", type=str | None, default=None,
        help=f"comma-separated subset of {','.join(STRATEGIES)} (default: active.strategies)",
    )  # fmt: skip
    run.add_argument("--fast", action="store_true", help="apply the config's active.fast preset")
    subcommands.add_subcommand("run", run, help=run.description)
    render = ArgumentParser(description="Redraw active.md and active.png from rounds.csv.")
    render.add_argument("--out", type=Path, required=True, help="results directory")
    render.add_argument("--title", type=str, default="kdzoo active")
    subcommands.add_subcommand("render", render, help=render.description)
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(own arguments, kdzoo fit overrides)``: an option whose name has a dot (and its value,
    when not given with ``=``) goes to the second list."""
    own, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(args):
                overrides.append(args[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def main(argv: Sequence[str] | None = None) -> None:
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    cfg = build_parser().parse_args(own)
    if cfg.subcommand == "render":
        from kdzoo.active.report import render

        markdown = render(cfg.render.out, cfg.render.title)
        if markdown is None:
            raise SystemExit(f"error: no rounds in {cfg.render.out / 'rounds.csv'}")
        print(markdown)
        return
    from kdzoo.active.loop import run_active

    args = cfg.run
    run_active(
        args.config,
        args.out,
        seeds=_split(args.seeds, int),
        strategies=_split(args.strategies, str),
        fast=args.fast,
        overrides=overrides,
    )


def _split(value: str | None, kind: type) -> list | None:
    if value is None:
        return None
    return [kind(part.strip()) for part in value.split(",") if part.strip()]
