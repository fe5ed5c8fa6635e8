"""``kdzoo fit|validate|test|predict``: :class:`KDCLI`, a LightningCLI with kdzoo's defaults.

Subclass mode for model and data (``--model KD --data FashionMNIST``), with the values that must
agree between data and model (classes, channels, normalisation) linked rather than repeated.
Around Lightning it adds what a user of the command expects:

- every run gets a readable name from its method, student and teacher
  (``runs/kd-test_resnet-resnet18/version_N``); ``--trainer.default_root_dir`` moves ``runs/``;
- ``--ckpt_path last`` (and ``best`` outside ``fit``) means *this* run's latest (best)
  checkpoint, and a checkpoint whose model (or, to resume training, data) config differs from the
  config given is refused with the differences named;
- evaluating without a checkpoint an untrained model is an error unless asked for;
- command-line mistakes are one line with a "did you mean" (see :mod:`kdzoo.cli_errors`);
- when stdout is not a terminal (nohup, SLURM), one line per epoch instead of a progress bar.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback, _InstantiatorFn

import kdzoo.datamodules
import kdzoo.methods  # noqa: F401  (registers the methods for --model NAME)
from kdzoo.callbacks import PredictionWriter
from kdzoo.checkpointing import AUTO_MONITOR, KDModelCheckpoint
from kdzoo.cli_errors import CommandLineError, explain_parse_error
from kdzoo.datamodules.base import LINKED_DATA_ATTRIBUTES
from kdzoo.loggers import plain
from kdzoo.models.weights import safe_torch_load
from kdzoo.progress import EpochLines

__all__ = ["KDCLI"]

EVALUATION_COMMANDS = ("validate", "test", "predict")
DEFAULT_SAVE_DIR = "runs"
# Keys that do not change what a run computes, so resuming with another value is allowed.
RESUMABLE_DIFFERENCES = {"num_workers", "download", "root", "predict_split", "predict_dir"}
_LINEAGE_KEYS = ("_class_path", "_instantiator", *LINKED_DATA_ATTRIBUTES)

USAGE = "kdzoo {} [-c CONFIG.yaml ...] [--model NAME] [--data NAME] [--OPTION VALUE ...]"
FIT_DESCRIPTION = """\
Train a student (or a teacher) from a config. Pick a method with --model NAME and a dataset with
--data NAME (`kdzoo list` shows every one with its paper), or start from a recipe:
  kdzoo fit -c configs/fashion_mnist/defaults.yaml \\
      -c configs/fashion_mnist/kd/test_resnet-resnet18.yaml \\
      --model.init_args.teacher.weights runs/supervised-resnet18/version_0/checkpoints/last.ckpt
Options a run usually needs: --model.student ARCH (a timm name), --model.teacher.weights FILE,
--data.root DIR, --trainer.max_epochs N, --ckpt_path last (resume this run), --print_config.
`--model.help NAME` / `--data.help NAME` list one method's / dataset's options. Every option:"""


def _quiet_lightning() -> None:
    """Drop Lightning's advertising tip and a deprecation warning it raises against new torch."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith("💡 Tip")

    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class _DataInstantiator(_InstantiatorFn):
    """Lightning's instantiator for ``data``, for the datamodule ``data`` configures only.

    Lightning's records the config of ``data`` as the hyper-parameters of every LightningDataModule
    it builds, also of one nested in the model's arguments (RMT's and PSMT's ``source_data``),
    which would then be set up with the stream's settings. Any other datamodule (another class
    or other arguments) is built plainly and records its own arguments.
    """

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        config = self.cli.config_dump.get(self.key) or {}
        ours = str(config.get("class_path", "")).rpartition(".")[2] == class_type.__name__
        same = json.dumps(config.get("init_args") or {}, sort_keys=True, default=str)
        if ours and same == json.dumps(kwargs, sort_keys=True, default=str):
            links = applied_instantiation_links
            return super().__call__(class_type, *args, applied_instantiation_links=links, **kwargs)
        return class_type(*args, **kwargs)


class _RawDescriptionFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of a subcommand's description (its example commands)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


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
    """LightningCLI with kdzoo's defaults: seeded runs, CSV logs under ``runs/<run name>/``,
    best/last checkpoints, data->model links, and ``--ckpt_path last`` meaning this run's latest
    state (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        _quiet_lightning()
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", KDSaveConfigCallback)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # jsonargparse gives subcommand parsers the main parser's formatter.
        kwargs["parser_kwargs"].setdefault("formatter_class", _RawDescriptionFormatter)
        # Parse errors are raised, then explained in one line (kdzoo.cli_errors), instead of
        # jsonargparse printing 60 lines of usage first.
        for name in ("", *EVALUATION_COMMANDS, "fit"):
            target = (
                kwargs["parser_kwargs"].setdefault(name, {}) if name else kwargs["parser_kwargs"]
            )
            target.setdefault("exit_on_error", False)
        fit_kwargs = kwargs["parser_kwargs"].setdefault("fit", {})
        fit_kwargs.setdefault("description", FIT_DESCRIPTION)
        for name in ("fit", *EVALUATION_COMMANDS):
            # The generated usage lists all ~300 options before anything else.
            kwargs["parser_kwargs"][name].setdefault("usage", USAGE.format(name))
        super().__init__(args=args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for attribute in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(
                f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate"
            )
        parser.add_argument(
            "--paper",
            type=dict[str, float] | None,
            default=None,
            help="what the method's paper (or official code) reports for this config, by "
            "metric name without the stage, e.g. {top1: 73.33} or {miou: 72.1} (in %%); "
            "kdzoo bench prints it beside the measured value",
        )
        parser.add_argument(
            "--untrained",
            type=bool,
            default=False,
            help="validate/test/predict: allow evaluating without --ckpt_path a model whose "
            "weights come from training (its random initialisation)",
        )
        parser.add_lightning_class_args(KDModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO_MONITOR,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "kdzoo.loggers.CSVLogger",
                    "init_args": {"save_dir": DEFAULT_SAVE_DIR, "name": None},
                },
            }
        )

    def parse_arguments(self, parser, args) -> None:
        # Lightning warns when both ``args`` and ``sys.argv`` are set; kdzoo always passes
        # ``args`` (kdzoo bench and kdzoo active run many configs in one process).
        try:
            if isinstance(args, dict | Namespace):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as err:
            explanation = renamed_option_hint(str(err)) or explain_parse_error(
                err, _option_strings(parser, args)
            )
            raise CommandLineError(explanation) from None

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(  # replaces Lightning's for ``data`` (the same key)
            _DataInstantiator(cli=self, key="data"),
            self._datamodule_class,
            subclasses=self.subclass_mode_data,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model config by the checkpoint's hyper-parameters here, before
        # anything else: resolve ``last``/``best`` to this run's file and refuse a checkpoint of
        # another model first.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        _honour_default_root_dir(config)
        _name_run(config)
        ckpt_path = config.get("ckpt_path")
        resume_run = subcommand == "fit" and ckpt_path == "last"
        if ckpt_path in ("last", "best") and (subcommand != "fit" or resume_run):
            config.ckpt_path = ckpt_path = _run_checkpoint(config, ckpt_path, subcommand)
        if ckpt_path not in (None, "best", "last"):
            checkpoint = safe_torch_load(ckpt_path)
            _check_checkpoint_matches(checkpoint, config, ckpt_path, subcommand)
            if resume_run:  # only now that it is known to be this config's run
                _continue_run(config, Path(ckpt_path))
        elif subcommand in EVALUATION_COMMANDS:
            _check_may_run_untrained(config, subcommand)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        if sys.stdout.isatty() or self.subcommand is None:
            return
        # Piped to a file (nohup, SLURM), a progress bar prints nothing until the run ends:
        # EpochLines prints one line per epoch instead.
        self.config[self.subcommand].trainer.enable_progress_bar = False

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        callbacks.append(EpochLines())
        return super()._instantiate_trainer(config, callbacks)


#: Top-level options renamed since an earlier kdzoo: old -> what replaces it.
RENAMED_OPTIONS = {
    "paper_top1": "paper: {top1: VALUE}",
    "paper_miou": "paper: {miou: VALUE}",
}


def renamed_option_hint(message: str) -> str | None:
    """A one-line error for an option that kdzoo renamed (a method's ``renamed_arguments``, or
    :data:`RENAMED_OPTIONS`), if the parse error names one; else None."""
    from kdzoo.methods.module import KDZooModule

    renamed = dict(RENAMED_OPTIONS)
    classes = [KDZooModule]
    while classes:
        cls = classes.pop()
        renamed.update(cls.renamed_arguments)
        classes.extend(cls.__subclasses__())
    for old in re.findall(r"\w+", message):
        if old in renamed:
            return f"{old} was renamed: use {renamed[old]} instead (in your config or command line)"
    return None


def _option_strings(parser, args: Any) -> list[str]:
    """The options of the subcommand parser ``args`` chose (for "did you mean")."""
    subcommands = getattr(parser, "_subcommands_action", None)
    choices = getattr(subcommands, "choices", {}) if subcommands is not None else {}
    chosen = next((a for a in args or [] if a in choices), None) if isinstance(args, list) else None
    sub = choices.get(chosen, parser)
    return [option for option in sub._option_string_actions if option.startswith("--")]


def _honour_default_root_dir(config: Namespace) -> None:
    """``--trainer.default_root_dir DIR`` puts the default logger's ``runs/`` under ``DIR``."""
    root = config.trainer.get("default_root_dir")
    init_args = _logger_args(config)
    if root and init_args is not None and init_args.get("save_dir") == DEFAULT_SAVE_DIR:
        init_args.save_dir = str(Path(root) / DEFAULT_SAVE_DIR)


def _logger_args(config: Namespace) -> Namespace | None:
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None) if logger else None
    return init_args if isinstance(init_args, Namespace) else None


def _name_run(config: Namespace) -> None:
    """A readable run name from method, student and teacher, e.g. ``kd-test_resnet-resnet18``,
    unless the logger was given a name."""
    init_args = _logger_args(config)
    if init_args is None or "name" not in init_args or init_args.name is not None:
        return
    init_args.name = run_name(config.get("model"))


def run_name(model: Any) -> str:
    """``<method>-<student>[-<teacher>]`` of a model config (lower-case method class name)."""
    if not isinstance(model, Namespace) or not model.get("class_path"):
        return "run"
    args = model.get("init_args") or Namespace()
    parts = [model.class_path.rsplit(".", 1)[-1].lower()]
    student = args.get("student") or args.get("backbone")
    if isinstance(student, str):
        parts.append(student)
    teacher = args.get("teacher") or args.get("source")
    if isinstance(teacher, Namespace | Mapping):
        teacher_name = teacher.get("name")
        if not teacher_name and teacher.get("weights"):
            teacher_name = Path(str(teacher["weights"])).stem
        if teacher_name:
            parts.append(str(teacher_name))
    elif args.get("specialists"):
        parts.append("specialists")
    return "-".join(parts).replace("/", "_").replace(":", "_")


def _run_checkpoint(config: Namespace, which: str, subcommand: str) -> str:
    """The newest ``last.ckpt`` (or ``best-*.ckpt``) of this run's versions."""
    init_args = _logger_args(config)
    if init_args is None or init_args.get("save_dir") is None:
        if which == "last" and subcommand == "fit":
            return which  # custom logger: leave "last" to Lightning
        raise CommandLineError(
            f"--ckpt_path {which} needs kdzoo's default CSV logger to find the run; pass the "
            "checkpoint's path instead"
        )
    root = Path(init_args.save_dir) / (init_args.get("name") or "lightning_logs")
    pattern = "last*.ckpt" if which == "last" else "best*.ckpt"
    candidates = sorted(
        root.glob(f"*/checkpoints/{pattern}"), key=lambda p: (p.stat().st_mtime, str(p))
    )
    if not candidates:
        start = "Start the run without --ckpt_path" if subcommand == "fit" else "Train it first"
        raise CommandLineError(
            f"--ckpt_path {which}: no {pattern} under {root}/*/checkpoints/ (this config's run "
            f"is named {root.name!r}). {start}, or pass the checkpoint's path."
        )
    latest = candidates[-1]
    print(f"kdzoo {subcommand}: --ckpt_path {which} is {latest}", file=sys.stderr)
    return str(latest)


def _continue_run(config: Namespace, checkpoint: Path) -> None:
    """Log the resumed run into the version directory its checkpoint belongs to."""
    run_dir = checkpoint.parent.parent
    _logger_args(config).version = run_dir.name
    _keep_earlier_metrics(run_dir)


def _keep_earlier_metrics(run_dir: Path) -> None:
    """Move ``metrics.csv`` aside: Lightning's CSVLogger deletes it when a run dir is reused.

    Part ``k`` of a run that was resumed ``n`` times keeps ``config[.k].yaml`` and
    ``metrics.k.csv``; the running part writes ``metrics.csv``.
    """
    # Lightning then warns that "previous log files will be deleted": they were kept just now.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not")
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


def _check_checkpoint_matches(
    checkpoint: Any, config: Namespace, ckpt_path: str, subcommand: str
) -> None:
    """Refuse a checkpoint whose model (for ``fit``: or data) differs from the config's."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CommandLineError(
            f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no state_dict); "
            "kdzoo fit writes them under runs/<run>/version_N/checkpoints/"
        )
    model = config.get("model")
    recorded = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(model, Namespace) or not model.get("class_path"):
        described = recorded.get("_class_path", "the model")
        print(f"kdzoo {subcommand}: using the model recorded in {ckpt_path}: {described}")
        return
    differences = _differences(recorded, model, "model")
    if subcommand == "fit":
        data = config.get("data")
        recorded_data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        if isinstance(data, Namespace) and recorded_data:
            differences += _differences(recorded_data, data, "data", RESUMABLE_DIFFERENCES)
    if differences:
        what = "resume" if subcommand == "fit" else subcommand
        raise CommandLineError(
            f"--ckpt_path {ckpt_path} is not a checkpoint of this config, refusing to {what} "
            f"it: {'; '.join(differences[:6])}"
            + (f" (and {len(differences) - 6} more)" if len(differences) > 6 else "")
            + ". Pass that run's own config (its config.yaml), or a checkpoint of this one."
        )


def _differences(
    recorded: Mapping[str, Any], current: Namespace, prefix: str, ignored: set[str] = frozenset()
) -> list[str]:
    """``key: checkpoint X, config Y`` for every recorded hyper-parameter the config changes."""
    recorded_class = recorded.get("_class_path")
    if recorded_class and recorded_class != current.get("class_path"):
        return [f"{prefix} is {recorded_class} in the checkpoint, {current.class_path} here"]
    given = plain(current.get("init_args") or {})
    out = []
    for key, value in recorded.items():
        if key in _LINEAGE_KEYS or key in ignored or key not in given:
            continue
        if _comparable(plain(value)) != _comparable(given[key]):
            out.append(f"{prefix}.{key}: checkpoint {plain(value)!r}, config {given[key]!r}")
    return out


def _comparable(value: Any) -> Any:
    """``value`` without what does not change a run: whether a teacher's outputs are computed
    or read from its cache (``teacher.cache``; the cache refuses any other difference)."""
    if isinstance(value, Mapping) and "cache" in value and "weights" in value:
        return {k: v for k, v in value.items() if k != "cache"}
    return value


def _check_may_run_untrained(config: Namespace, subcommand: str) -> None:
    """Evaluating a method whose weights come from training needs a checkpoint."""
    if config.get("untrained"):
        return
    model = config.get("model")
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    if not class_path:
        return
    from jsonargparse.typing import import_object

    if getattr(import_object(class_path), "evaluates_without_checkpoint", False):
        return
    name = class_path.rsplit(".", 1)[-1]
    raise CommandLineError(
        f"no --ckpt_path: `kdzoo {subcommand}` would evaluate an untrained {name} model. Pass "
        f"--ckpt_path FILE (or `last`/`best` for this config's run, "
        f"runs/{run_name(model)}/), or --untrained true to evaluate the random initialisation"
    )
