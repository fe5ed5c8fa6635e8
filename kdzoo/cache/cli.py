"""``kdzoo cache build|verify|info``: build, check and describe teacher-output caches.

    kdzoo cache build -c run.yaml --epochs E --out DIR [--k K] [--dtype float32] [--outputs ...]
    kdzoo cache verify DIR -c run.yaml [--samples N]
    kdzoo cache info DIR

``-c`` files and any other ``--model.* / --data.* / --trainer.*`` options are those of
``kdzoo fit`` for the run whose teacher is cached (a classification distillation run or a
CrossModalKD run; it must set ``--data.init_args.augment_seed``); train from the cache with the
same run and ``--model.init_args.teacher.cache DIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdzoo.errors import KDZooError

__all__ = ["main"]

TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdzoo cache", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="run a run config's teacher over E epochs of its exact-replay views",
        description="Run the teacher of a run config over E epochs of its exact-replay training "
        "views and store its outputs in DIR (resumes an interrupted build). Other options are "
        "kdzoo fit's (-c FILE, --model.*, --data.*, --trainer.devices/strategy/precision).",
    )
    build.add_argument("--epochs", type=int, required=True, help="epochs to store")
    build.add_argument("--out", type=Path, required=True, help="the cache directory")
    build.add_argument(
        "--k", type=int, default=None,
        help="store the top-k logits (default: every logit up to 100 classes, else top-10)",
    )  # fmt: skip
    build.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16",
        help="stored value type: float16 (half the size; students end within seed noise of "
        "live training) or float32 (students bit-identical to live training)",
    )  # fmt: skip
    build.add_argument(
        "--outputs", nargs="*", default=(),
        help="outputs beyond the logits and what the run's method needs: embedding_norm, "
        "embedding_class_means, softmax_class_means",
    )  # fmt: skip
    build.add_argument("--chunk_size", type=int, default=8192, help="samples per shard")
    build.add_argument("--batch_size", type=int, default=None, help="default: the run's")
    verify = commands.add_parser(
        "verify",
        help="recompute random entries with the live teacher and check every shard",
        description="Recompute N random (epoch, sample) entries with the live teacher of a run "
        "config, report the largest difference, and check every shard against its sha256.",
    )
    verify.add_argument("directory", type=Path)
    verify.add_argument("--samples", type=int, default=64, help="entries to recompute")
    verify.add_argument("--seed", type=int, default=0, help="which entries")
    info = commands.add_parser("info", help="print the manifest and the size on disk")
    info.add_argument("directory", type=Path)
    return parser


def instantiate_run(run_args: list[str]) -> Any:
    """The run's LightningCLI, classes instantiated but nothing run (``-c`` checked first)."""
    from kdzoo.cli_errors import check_config_files, reorder_class_options

    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in run_args):
        raise KDZooError("give the run config whose teacher is cached: -c RUN.yaml")
    run_args = reorder_class_options(["fit", *run_args])[1:]
    check_config_files(["fit", *run_args])
    from kdzoo.lightning_cli import KDCLI

    return KDCLI(args=run_args, run=False)


def trainer_options(cli: Any) -> dict[str, Any]:
    """Where the run's trainer would run (devices, strategy, precision)."""
    config = cli.config.trainer
    options = {key: config[key] for key in TRAINER_KEYS if config.get(key) is not None}
    if not isinstance(options.get("strategy", "auto"), str):
        options["strategy"] = cli.trainer.strategy
    return options


def main(argv: Sequence[str]) -> None:
    args, rest = build_parser().parse_known_args(list(argv))
    if args.command == "info":
        if rest:
            raise KDZooError(f"kdzoo cache info takes only DIR, got {' '.join(rest)}")
        from kdzoo.cache.report import describe

        print(describe(args.directory))
        return
    cli = instantiate_run(rest)
    if args.command == "build":
        from kdzoo.cache.build import build_cache

        manifest = build_cache(
            cli.model,
            cli.datamodule,
            args.out,
            epochs=args.epochs,
            trainer_options=trainer_options(cli),
            k=args.k,
            outputs=args.outputs,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            dtype=args.dtype,
        )
        if cli.trainer.global_rank == 0:
            from kdzoo.cache.report import describe

            print(describe(args.out, manifest))
        return
    from kdzoo.cache.report import verify

    print(verify(args.directory, cli.model, cli.datamodule, samples=args.samples, seed=args.seed))
