"""The ``kdzoo`` command: LightningCLI for training and evaluation, plus non-training tools.

``kdzoo fit|validate|test|predict`` is :class:`KDCLI`, a LightningCLI in subclass mode for model
and data (``--model KD --data FashionMNIST``), with the values that must agree between data and
model (classes, channels, normalisation) linked rather than repeated. Other jobs (``kdzoo bench``)
are subcommands of the same entry point, built with jsonargparse.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import kdzoo.datamodules
import kdzoo.methods  # noqa: F401  (registers the methods for --model NAME)
from kdzoo.callbacks import PredictionWriter
from kdzoo.errors import KDZooError
from kdzoo.models.weights import safe_torch_load

__all__ = ["KDCLI", "main"]

TRAINER_COMMANDS = {
    "fit": "Train a student (or a teacher) from a config.",
    "validate": "Run one evaluation epoch on the validation split.",
    "test": "Evaluate a checkpoint on the test split.",
    "predict": "Predict class probabilities for the predict split.",
}
# Values every model takes from the datamodule, so the two can never disagree. A link whose
# datamodule attribute does not exist is skipped: paired-modality data has ``modality_shapes``
# instead of ``in_chans``/``mean``/``std``, and only paired-modality models take it.
LINKED_DATA_ATTRIBUTES = ("num_classes", "in_chans", "mean", "std", "modality_shapes")


def _quiet_lightning() -> None:
    """Drop Lightning's advertising tip and a deprecation warning it raises against new torch."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith("💡 Tip")

    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class KDSaveConfigCallback(SaveConfigCallback):
    """Saves the run's full config next to its logs, never overwriting an earlier one.

    A resumed run logs into the directory of the run it resumes; its config is then saved as
    ``config.1.yaml``, ``config.2.yaml``, ... beside the original ``config.yaml``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = Path(trainer.log_dir)
            stem, suffix = Path(self.config_filename).stem, Path(self.config_filename).suffix
            candidate, n = self.config_filename, 0
            if trainer.is_global_zero:
                while (log_dir / candidate).exists():
                    n += 1
                    candidate = f"{stem.split('.')[0]}.{n}{suffix}"
            self.config_filename = trainer.strategy.broadcast(candidate)
        super().setup(trainer, pl_module, stage)


class KDCLI(LightningCLI):
    """LightningCLI with kdzoo's defaults: seeded runs, CSV logs under ``runs/``, best/last
    checkpoints, data->model links, and ``fit --ckpt_path last`` resuming the latest run."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", KDSaveConfigCallback)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(args=args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for attribute in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(
                f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate"
            )
        parser.add_argument(
            "--paper_top1",
            type=float | None,
            default=None,
            help="the top-1 accuracy (%%) the method's paper reports for this config; "
            "kdzoo bench prints it beside the measured one",
        )
        parser.add_argument(
            "--paper_miou",
            type=float | None,
            default=None,
            help="the mIoU (%%) the method's paper or official code reports for this "
            "segmentation config; kdzoo bench prints it beside the measured one",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs"},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("ckpt_path") == "last":
            _resume_latest_run(config)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, before anything else; check
        # first that it holds only tensors and plain containers, so an unsafe file gets a clear
        # refusal instead of a traceback (nothing is ever unpickled beyond weights_only).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "best", "last"):
            safe_torch_load(ckpt_path)
        super()._parse_ckpt_path()


def _resume_latest_run(config) -> None:
    """Point ``ckpt_path last`` at the newest ``last.ckpt`` of this logger and log into its run.

    Lightning resolves ``last`` only inside the current run's directory, which a new process
    never has; users mean "continue my last run".
    """
    logger = config.trainer.logger
    init_args = getattr(logger, "init_args", None) if logger else None
    if init_args is None or init_args.get("save_dir") is None:
        return  # custom logger: leave "last" to Lightning
    name = init_args.get("name") or "lightning_logs"
    root = Path(init_args.save_dir) / name
    candidates = sorted(root.glob("*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(
            f"error: --ckpt_path last: no last.ckpt under {root}/*/checkpoints/. "
            "Start the run without --ckpt_path, or pass the checkpoint's path."
        )
    latest = candidates[-1]
    config.ckpt_path = str(latest)
    run_dir = latest.parent.parent
    init_args.version = run_dir.name
    _keep_earlier_metrics(run_dir)


def _keep_earlier_metrics(run_dir: Path) -> None:
    """Move ``metrics.csv`` aside: Lightning's CSVLogger deletes it when a run dir is reused.

    Part ``k`` of a run that was resumed ``n`` times keeps ``config[.k].yaml`` and
    ``metrics.k.csv``; the running part writes ``metrics.csv``.
    """
    is_launcher = (
        os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    )
    metrics = run_dir / "metrics.csv"
    if not is_launcher or not metrics.is_file():
        return
    part = 0
    while (run_dir / f"metrics.{part}.csv").exists():
        part += 1
    metrics.rename(run_dir / f"metrics.{part}.csv")
    print(f"kdzoo: resuming {run_dir}; earlier metrics kept in metrics.{part}.csv", file=sys.stderr)


def _active(argv: Sequence[str]) -> None:
    from kdzoo.active.cli import main as active_main

    active_main(argv)


def _bench(argv: Sequence[str]) -> None:
    from kdzoo.bench import main as bench_main

    bench_main(argv)


def _hub(argv: Sequence[str]) -> None:
    from kdzoo.hub.cli import main as hub_main

    hub_main(argv)


TOOL_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "active": (
        "Active learning with distillation, resumable rounds (`kdzoo active --help`).",
        _active,
    ),
    "bench": (
        "Run a benchmark suite and render its table and plot (`kdzoo bench --help`).",
        _bench,
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
    _quiet_lightning()
    try:
        if args[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[args[0]][1](args[1:])
            return
        # LightningCLI reads sys.argv itself when run as a program (and warns if given both).
        KDCLI(args=None if argv is None else args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("KDZOO_DEBUG"):
            raise
        print(f"kdzoo {args[0]}: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


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
