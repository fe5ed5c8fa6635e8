"""Which networks a finished benchmark suite deploys, and their cost rows.

``tools/bench_cost.py`` measures every run of a suite's results CSV (:func:`measure_suite`) and,
for a suite with an active-learning part, each selection strategy's student
(:func:`measure_active`): each run's deployed network is rebuilt from its log directory
(:func:`load_run_network`) and measured by :func:`kdzoo.cost.measure`, once per distinct network
and input. See :mod:`kdzoo.cost` for what the columns mean.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdzoo.cost import RUNTIMES, CostError, cpu_name, measure, onnxruntime_version
from kdzoo.methods.module import METHOD_KEY, Deployable, KDZooModule
from kdzoo.models.weights import WeightsError, load_strictly, safe_torch_load
from kdzoo.results import read_rows

__all__ = [
    "RunNetwork",
    "active_log_dirs",
    "active_strategies",
    "input_shapes",
    "load_run_network",
    "measure_active",
    "measure_log_dirs",
    "measure_suite",
    "newest_round",
    "suite_log_dirs",
]


# ---- a run's network and input --------------------------------------------------------------


@dataclasses.dataclass
class RunNetwork:
    """A run's deployed network (:attr:`Deployable.deployed`: ``forward`` gives the prediction),
    the per-sample shape of each of its inputs, whether it takes images of any size, and where
    its weights came from (a checkpoint file, or ``random`` for a run that saved none)."""

    network: nn.Module
    shapes: list[tuple[int, ...]]
    any_size: bool
    weights: str


def load_run_network(log_dir: str | Path) -> RunNetwork:
    """The deployed network of the run logged in ``log_dir`` (``runs/<suite>/<run>/version_N``).

    A run that trained has a best checkpoint (``checkpoints/best*.ckpt``, the newest if several):
    its hyper-parameters, datamodule hyper-parameters and student weights are used. A run that
    only tested (test-time adaptation) saved none: its ``config.yaml`` (model and data classes,
    data arguments) and ``hparams.yaml`` (the model's hyper-parameters) are used, with the
    network's random initialisation (weights do not change its cost).
    """
    log_dir = Path(log_dir)
    checkpoints = sorted(log_dir.glob("checkpoints/best*.ckpt"), key=lambda p: p.stat().st_mtime)
    state: Mapping[str, torch.Tensor] | None = None
    if checkpoints:
        checkpoint = safe_torch_load(checkpoints[-1])
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.setdefault("_class_path", checkpoint.get(METHOD_KEY))
        data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        state = checkpoint.get("state_dict")
        weights = checkpoints[-1].name
    elif (log_dir / "config.yaml").is_file() and (log_dir / "hparams.yaml").is_file():
        config = yaml.safe_load((log_dir / "config.yaml").read_text())
        hparams = dict(yaml.safe_load((log_dir / "hparams.yaml").read_text()) or {})
        hparams["_class_path"] = config["model"]["class_path"]
        data = {"_class_path": config["data"]["class_path"], **config["data"]["init_args"]}
        weights = "random"
    else:
        raise CostError(f"{log_dir} holds no best*.ckpt and no config.yaml + hparams.yaml")
    method = _import(hparams.get("_class_path"), KDZooModule, log_dir, "method")
    try:
        deployable = method.deployable(hparams)
    except (KeyError, TypeError, NotImplementedError) as err:
        raise CostError(f"{log_dir}: {method.__name__} cannot rebuild its network ({err})") from err
    if state is not None:
        prefix = deployable.prefix
        student = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            into = type(deployable.network).__name__
            load_strictly(deployable.network, student, what=f"the student of {weights}", into=into)
        except WeightsError as err:  # the cost is the same with the initial weights
            warnings.warn(f"{log_dir}: random weights measured ({err})", stacklevel=2)
            weights = "random"
    datamodule = _import(data.get("_class_path"), object, log_dir, "datamodule", kdzoo_only=True)
    args = {k: v for k, v in data.items() if not k.startswith("_")}
    shapes = input_shapes(deployable, datamodule(**args))
    return RunNetwork(deployable.deployed.eval(), shapes, deployable.any_size, weights)


def input_shapes(deployable: Deployable, data: Any) -> list[tuple[int, ...]]:
    """The per-sample shape of each input of a deployed network: the shapes it declares
    (:attr:`Deployable.inputs`, paired-modality networks), else one image of its ``in_chans``
    (``model_args``) at the datamodule's training crop (``crop_size``, segmentation) or
    ``image_size`` (classification, test-time adaptation)."""
    if deployable.inputs is not None:
        return [tuple(int(d) for d in shape) for shape in deployable.inputs]
    size = getattr(data, "crop_size", None) or getattr(data, "image_size", None)
    if size is None:
        raise CostError(f"{type(data).__name__} has no crop_size or image_size")
    height, width = (size, size) if isinstance(size, int) else size
    return [(int(deployable.model_args.get("in_chans") or 3), int(height), int(width))]


def _import(
    class_path: Any, base: type, log_dir: Path, what: str, kdzoo_only: bool = False
) -> type:
    """The class a recorded ``_class_path`` names (only kdzoo's own with ``kdzoo_only``)."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise CostError(f"{log_dir} does not record its {what} class")
    if kdzoo_only and not class_path.startswith("kdzoo."):
        raise CostError(f"{log_dir}: {what} {class_path} is not kdzoo's; its input is unknown")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError as err:
        raise CostError(f"{log_dir}: {what} {class_path} cannot be imported ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CostError(f"{log_dir}: {class_path} is not a kdzoo {what}")
    return cls


# ---- a suite --------------------------------------------------------------------------------


def measure_suite(
    results: str | Path,
    runs: str | Path | None = None,
    *,
    warmup: int = 5,
    reps: int = 30,
    runtimes: Sequence[str] = tuple(RUNTIMES),
    git_commit: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One cost row (:data:`kdzoo.results.COST_FIELDS`) per run of the results CSV ``results``
    (``<out>/<suite>.csv`` as ``kdzoo bench run`` writes it, or the committed
    ``benchmarks/<suite>.csv``).

    Each run's network comes from its newest row's log directory (the parent of its ``config``
    column; where that is gone, the newest ``<runs>/<run>/version_*``, ``runs`` being
    ``<out>/runs/<suite>``; an ``also_report`` row points at the run that logged it) via
    :func:`load_run_network`. Runs with the same network (module structure) and input shape are
    measured once and share the numbers. A run whose network cannot be rebuilt
    (:class:`CostError`) is logged and left out. ``git_commit`` is the checkout's commit
    (:func:`kdzoo.bench.git_commit`), recorded in every row.
    """
    options = {"warmup": warmup, "reps": reps, "runtimes": runtimes, "git_commit": git_commit}
    return measure_log_dirs(suite_log_dirs(results, runs, log=log), log=log, **options)


def suite_log_dirs(
    results: str | Path, runs: str | Path | None = None, *, log: Callable[[str], None] = print
) -> list[tuple[str, str, Path]]:
    """``(run, student, log_dir)`` of each run of the results CSV ``results``, as
    :func:`measure_suite` finds them; a run whose log directory is gone is logged and left out."""
    newest: dict[str, Mapping[str, str]] = {}  # runs in order, each its last (newest) row
    for row in read_rows(results):
        newest[row["run"]] = row
    found = []
    for run, row in newest.items():
        try:
            found.append((run, row.get("student", ""), _log_dir(run, row.get("config", ""), runs)))
        except CostError as err:
            log(f"{run}: skipped, {err}")
    return found


def measure_active(
    active: str | Path,
    *,
    warmup: int = 5,
    reps: int = 30,
    runtimes: Sequence[str] = tuple(RUNTIMES),
    git_commit: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One cost row per selection strategy of the active-learning results directory ``active``
    (``<out>/<suite>_active`` as ``kdzoo bench run`` or ``kdzoo active run`` writes it), its
    ``run`` the strategy's name: what a pivot table of the rounds joins by its rows.

    Every round of every strategy trains a fresh student of the same configuration, so a round's
    network is the strategy's; the newest round's log directory (:func:`newest_round`) is
    measured. Rounds keep no checkpoints, so :func:`load_run_network` rebuilds the network from
    the round's ``config.yaml`` + ``hparams.yaml`` with random weights, which do not change the
    cost. The strategies are those of ``rounds.csv`` (:func:`active_strategies`), in its order;
    as in :func:`measure_suite`, identical networks on identical inputs are measured once, and a
    strategy whose network cannot be rebuilt is logged and left out.
    """
    options = {"warmup": warmup, "reps": reps, "runtimes": runtimes, "git_commit": git_commit}
    return measure_log_dirs(active_log_dirs(active, log=log), log=log, **options)


def active_log_dirs(
    active: str | Path, *, log: Callable[[str], None] = print
) -> list[tuple[str, str, Path]]:
    """``(strategy, student, log_dir)`` of each strategy of the active-learning results directory
    ``active``, as :func:`measure_active` finds them; a strategy without a round's log directory
    is logged and left out."""
    found = []
    for strategy in active_strategies(active):
        try:
            log_dir = newest_round(Path(active) / strategy)
        except CostError as err:
            log(f"{strategy}: skipped, {err}")
            continue
        found.append((strategy, _logged_student(log_dir), log_dir))
    return found


def active_strategies(active: str | Path) -> list[str]:
    """The strategies of the active-learning results directory ``active``, in the order of its
    ``rounds.csv`` (one row per finished round, :mod:`kdzoo.active.report`)."""
    path = Path(active) / "rounds.csv"
    if not path.is_file():
        raise CostError(
            f"{active} holds no rounds.csv: not an active-learning results directory "
            "(kdzoo active run, or kdzoo bench run of a suite with an active: block, writes one)"
        )
    with path.open(newline="") as f:
        return list(dict.fromkeys(row["strategy"] for row in csv.DictReader(f)))


# A round's log directory under its strategy's folder, as the active-learning loop names it.
_ROUND_DIR = re.compile(r"seed(\d+)/round(\d+)/version_(\d+)")


def newest_round(strategy_dir: str | Path) -> Path:
    """The log directory of a strategy's newest round, ``seed<k>/round<r>/version_<n>`` under
    ``strategy_dir``, among those holding ``config.yaml`` and ``hparams.yaml`` (a round stopped
    before training holds neither): the highest round, then seed, then version. Numbers are
    compared as numbers (round10 after round9), not by the folders' times, which a copy changes."""
    strategy_dir = Path(strategy_dir)
    rounds = {}
    for path in strategy_dir.glob("seed*/round*/version_*"):
        match = _ROUND_DIR.fullmatch(path.relative_to(strategy_dir).as_posix())
        if match and (path / "config.yaml").is_file() and (path / "hparams.yaml").is_file():
            seed, round_, version = map(int, match.groups())
            rounds[(round_, seed, version)] = path
    if not rounds:
        raise CostError(f"{strategy_dir} holds no seed*/round*/version_* with a logged config")
    return rounds[max(rounds)]


def _logged_student(log_dir: Path) -> str:
    """The student a round logged in ``hparams.yaml`` (its timm name), ``""`` if none."""
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text()) or {}
    return str(hparams.get("student") or "")


def measure_log_dirs(
    found: Sequence[tuple[str, str, Path]],
    *,
    warmup: int = 5,
    reps: int = 30,
    runtimes: Sequence[str] = tuple(RUNTIMES),
    git_commit: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One cost row per ``(run, student, log_dir)`` of ``found`` (:func:`suite_log_dirs`,
    :func:`active_log_dirs`, or both, so that a suite's runs and its strategies share a
    measurement too), in order: the network of ``log_dir`` (:func:`load_run_network`) measured
    once per distinct network (module structure) and input shapes, later runs of the same one
    sharing its numbers; a run whose network cannot be rebuilt (:class:`CostError`) logged and
    left out."""
    common = {
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime_version() if "onnxruntime" in runtimes else "",
        "git_commit": git_commit,
    }
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    cost_rows = []
    for run, student, log_dir in found:
        try:
            loaded = load_run_network(log_dir)
        except CostError as err:
            log(f"{run}: skipped, {err}")
            continue
        key = (repr(loaded.network), repr(loaded.shapes))
        if key not in measured:
            start = time.perf_counter()
            measured[key] = measure(
                loaded.network,
                loaded.shapes,
                any_size=loaded.any_size,
                warmup=warmup,
                reps=reps,
                runtimes=runtimes,
            )
            log(f"{run}: {measured[key]} ({time.perf_counter() - start:.0f} s, {loaded.weights})")
        else:
            log(f"{run}: the network of an earlier run")
        cost_rows.append(
            {
                "run": run,
                "student": student,
                "input": "+".join("x".join(map(str, s)) for s in loaded.shapes),
                **measured[key],
                **common,
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
    return cost_rows


def _log_dir(run: str, config: str, runs: str | Path | None) -> Path:
    if config and Path(config).parent.is_dir():
        return Path(config).parent
    versions = sorted(
        Path(runs or ".").joinpath(run).glob("version_*"), key=lambda p: int(p.name.split("_")[1])
    )
    if runs is None or not versions:
        raise CostError(f"run {run!r}: its log directory is gone ({config or 'no config'})")
    return versions[-1]
