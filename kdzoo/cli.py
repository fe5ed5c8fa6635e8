"""The ``kdzoo`` command: dispatches to LightningCLI (training, evaluation) or a tool.

This module imports nothing heavy: ``kdzoo --help`` and ``kdzoo hub --help`` answer without
loading torch or Lightning, and a bad ``-c`` file is reported before they load.
``kdzoo fit|validate|test|predict`` is :class:`kdzoo.lightning_cli.KDCLI`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kdzoo.errors import KDZooError

__all__ = ["main"]

TRAINER_COMMANDS = {
    "fit": "Train a student (or a teacher) from a config.",
    "validate": "Run one evaluation epoch on the validation split.",
    "test": "Evaluate a checkpoint on the test split.",
    "predict": "Predict classes for the predict split or a folder of images.",
}


def __getattr__(name: str) -> Any:
    # ``from kdzoo.cli import KDCLI`` keeps working without making every kdzoo command pay for
    # importing Lightning.
    if name == "KDCLI":
        from kdzoo.lightning_cli import KDCLI

        return KDCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _active(argv: Sequence[str]) -> None:
    from kdzoo.active.cli import main as active_main

    active_main(argv)


def _bench(argv: Sequence[str]) -> None:
    from kdzoo.bench import main as bench_main

    bench_main(argv)


def _cache(argv: Sequence[str]) -> None:
    from kdzoo.cache.cli import main as cache_main

    cache_main(argv)


def _hub(argv: Sequence[str]) -> None:
    from kdzoo.hub.cli import main as hub_main

    hub_main(argv)


def _list(argv: Sequence[str]) -> None:
    if argv:
        raise KDZooError(f"kdzoo list takes no arguments, got {' '.join(argv)}")
    from kdzoo.catalog import main as list_main

    list_main()


TOOL_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "list": ("Every method (--model) and dataset (--data) with its paper.", _list),
    "active": (
        "Active learning with distillation, resumable rounds (`kdzoo active --help`).",
        _active,
    ),
    "bench": (
        "Run a benchmark suite and render its table and plot (`kdzoo bench --help`).",
        _bench,
    ),
    "cache": (
        "Build, verify and describe teacher-output caches (`kdzoo cache --help`).",
        _cache,
    ),
    "hub": (
        "Export, list, download and verify published checkpoints (`kdzoo hub --help`).",
        _hub,
    ),
}


def _print_help() -> None:
    names = [*TRAINER_COMMANDS, *TOOL_COMMANDS]
    lines = [
        f"usage: kdzoo {{{','.join(names)}}} ...",
        "",
        "kdzoo: knowledge distillation over timm backbones, driven by PyTorch Lightning.",
        "",
        "subcommands:",
    ]
    for name, text in TRAINER_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (text, _) in TOOL_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += [
        "",
        "Run `kdzoo SUBCOMMAND --help` for the options of one subcommand, e.g.",
        "  kdzoo fit --model KD --data FashionMNIST --print_config",
    ]
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        _print_help()
        return
    # A log file (nohup, SLURM) sees each line when it is printed, not when the run ends.
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)
    try:
        if args[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[args[0]][1](args[1:])
            return
        _run_trainer_command(args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("KDZOO_DEBUG"):
            raise
        print(f"kdzoo {args[0]}: error: {_one_line(user_error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_trainer_command(args: list[str]) -> None:
    from kdzoo.cli_errors import CommandLineError, check_config_files, did_you_mean

    if args[0] not in TRAINER_COMMANDS:
        known = [*TRAINER_COMMANDS, *TOOL_COMMANDS]
        raise CommandLineError(
            f"unknown subcommand {args[0]!r}{did_you_mean(args[0], known)} "
            f"Subcommands: {', '.join(known)} (`kdzoo --help`)"
        )
    from kdzoo.cli_errors import reorder_class_options

    args = reorder_class_options(args)
    check_config_files(args)
    from kdzoo.lightning_cli import KDCLI

    KDCLI(args=args)


def _one_line(error: KDZooError) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker, without the worker's
    traceback that PyTorch puts in front of it."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if type(error).__name__ + ": " in last else last


def _user_error(err: BaseException | None) -> KDZooError | None:
    """The :class:`KDZooError` behind ``err``; jsonargparse wraps errors raised in ``__init__``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KDZooError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
