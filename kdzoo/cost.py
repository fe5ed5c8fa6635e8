"""What a run's student costs at inference: parameters, MACs and CPU throughput.

Result tables show, beside each run's metric, the cost of the network the run deploys (its
method's :meth:`~kdzoo.methods.module.KDZooModule.deployable`, the module whose ``forward`` gives
the prediction, :attr:`~kdzoo.methods.module.Deployable.deployed`, as ``kdzoo hub export``
writes it) on the input the run was trained on:

* **parameters**: every parameter of the network (weights and biases); buffers such as
  BatchNorm's running statistics are not parameters.
* **MACs** per image: multiply-accumulates of the convolutions, matrix products (linear layers)
  and attention, counted by PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode`,
  which reports FLOPs = 2 x MACs for these operations; here MACs = its FLOPs / 2. Like fvcore and
  ptflops, it leaves out element-wise operations, normalisation, pooling and bias additions.
* **throughput**: images per second of CPU inference at batch 1 and batch 32, in PyTorch eager
  (``inference_mode``) and in onnxruntime (the graph ``kdzoo hub export --format onnx`` writes,
  :func:`kdzoo.hub.onnx_export.export_onnx`, exported into a temporary folder), the median over
  timed repetitions after untimed warm-up ones. Both runtimes use torch's thread count
  (``torch.get_num_threads()``), recorded with the CPU and the versions.

Throughput is measured on a finished suite by ``tools/bench_cost.py`` (:func:`measure_suite`),
on a quiet machine, never by the training run: training loads the machine, and a number measured
there says little. A suite's active-learning part (``<out>/<suite>_active``) adds one row per
selection strategy, named after it (:func:`measure_active`: every round trains the same student
network). The rows go to ``benchmarks/<suite>_cost.csv`` (:data:`kdzoo.results.COST_FIELDS`),
which the result tables join by run name, a pivot table of the rounds by strategy
(:func:`kdzoo.results.read_cost`, ``render_table(cost=...)``, ``render_pivot(cost=...)``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdzoo.errors import KDZooError
from kdzoo.methods.module import METHOD_KEY, Deployable, KDZooModule
from kdzoo.models.weights import WeightsError, load_strictly, safe_torch_load
from kdzoo.results import read_rows

__all__ = [
    "BATCHES",
    "RUNTIMES",
    "CostError",
    "RunNetwork",
    "active_log_dirs",
    "active_strategies",
    "count_macs",
    "count_parameters",
    "input_shapes",
    "load_run_network",
    "measure",
    "measure_active",
    "measure_log_dirs",
    "measure_suite",
    "newest_round",
    "onnx_session",
    "onnxruntime_version",
    "suite_log_dirs",
    "throughput",
]

#: The batch sizes of the throughput columns.
BATCHES = (1, 32)
#: The runtimes of the throughput columns, with their column prefix.
RUNTIMES = {"eager": "eager", "onnxruntime": "ort"}

Shapes = Sequence[Sequence[int]]


class CostError(KDZooError, ValueError):
    """A run whose deployable network or input shape cannot be rebuilt from what it saved."""


# ---- counting and timing --------------------------------------------------------------------


def count_parameters(module: nn.Module) -> int:
    """The number of parameters of ``module`` (weights and biases; a parameter shared by
    several layers counted once; buffers not counted)."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on ``example_input`` (a tensor, or
    a sequence of tensors passed as positional arguments), for the whole batch.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: convolutions, matrix products
    and attention, which it counts as 2 FLOPs per MAC, so this is its total FLOPs / 2 (e.g.
    ``nn.Linear(7, 5)`` on a ``(1, 7)`` input: 35). Element-wise operations, normalisation,
    pooling and bias additions are not counted. The module runs in whatever mode it is in
    (call ``eval()`` first to count inference), under ``torch.no_grad``.
    """
    inputs = (example_input,) if torch.is_tensor(example_input) else tuple(example_input)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def onnx_session(module: nn.Module, shapes: Shapes, *, any_size: bool = False) -> Any:
    """An onnxruntime CPU session of ``module`` (eval mode; ``forward`` returns one tensor): the
    graph ``kdzoo hub export --format onnx`` writes (:func:`kdzoo.hub.onnx_export.export_onnx`:
    dynamic batch axis, outputs checked against PyTorch's), exported into a temporary folder.

    ``shapes`` are the per-sample shapes of the inputs; the session runs on
    ``torch.get_num_threads()`` threads. Needs ``pip install 'kdzoo[onnx]'``; raises
    :class:`~kdzoo.hub.onnx_export.OnnxError` when the export fails or does not reproduce
    PyTorch.
    """
    import onnxruntime as ort

    from kdzoo.hub.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(module.eval(), shapes, path, any_size=any_size)
        graph = path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def throughput(
    model: nn.Module | Any,
    input_shape: Sequence[int] | Shapes,
    batch: int,
    *,
    warmup: int = 5,
    reps: int = 30,
) -> float:
    """Images per second of CPU inference on random inputs of ``batch`` images.

    Args:
        model: a network, run in PyTorch eager (eval mode, ``inference_mode``, torch's threads),
            or an onnxruntime session of it (:func:`onnx_session`).
        input_shape: the per-image input shape, e.g. ``(3, 32, 32)``, or one per positional
            input of a network with several (e.g. a fusion net's two modalities).
        batch: images per forward pass.
        warmup: untimed forward passes first.
        reps: timed forward passes; the result is ``batch`` / their median time.
    """
    if batch < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, reps >= 1, warmup >= 0; got {batch}, {reps}, {warmup}")
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, *s, generator=generator) for s in _as_shapes(input_shape)]
    if isinstance(model, nn.Module):
        model.eval()

        def run() -> Any:
            with torch.inference_mode():
                return model(*inputs)

    else:
        names = [i.name for i in model.get_inputs()]
        feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}

        def run() -> Any:
            return model.run(None, feed)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def onnxruntime_version() -> str:
    """onnxruntime's version, ``""`` when it (or onnx, onnxscript) is not installed."""
    try:
        import onnx  # noqa: F401  (the exporter needs all three)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        return ""
    return onnxruntime.__version__


def _as_shapes(shape: Sequence[int] | Shapes) -> list[tuple[int, ...]]:
    if all(isinstance(s, int) for s in shape):
        return [tuple(shape)]  # type: ignore[arg-type]
    return [tuple(int(d) for d in s) for s in shape]  # type: ignore[union-attr]


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


def measure(
    network: nn.Module,
    shapes: Shapes,
    *,
    any_size: bool = False,
    warmup: int = 5,
    reps: int = 30,
    runtimes: Sequence[str] = tuple(RUNTIMES),
) -> dict[str, Any]:
    """The cost columns of one deployed network: ``params``, ``macs`` per image and
    ``<eager|ort>_b<batch>`` (images/s, :func:`throughput`) for each of :data:`BATCHES`
    (``""`` for a runtime not in ``runtimes``).

    MACs are counted on a batch of 2, halved: a network that normalises with the batch's own
    statistics (test-time adaptation) cannot take a single image whose last feature map is 1x1.
    A throughput the network or runtime cannot give (such a batch; onnxruntime not installed;
    an export that fails its check) is ``""``, with a warning saying why.
    """
    network.eval()
    row: dict[str, Any] = {
        "params": count_parameters(network),
        "macs": count_macs(network, [torch.zeros(2, *s) for s in shapes]) // 2,
        **{f"{column}_b{batch}": "" for column in RUNTIMES.values() for batch in BATCHES},
    }
    for runtime in [r for r in RUNTIMES if r in runtimes]:  # eager first: see below
        column = RUNTIMES[runtime]
        model: Any = network
        if runtime == "onnxruntime":
            if not onnxruntime_version():
                note = "onnxruntime columns empty: onnx, onnxscript or onnxruntime not installed"
                warnings.warn(f"{note} (pip install 'kdzoo[onnx]')", stacklevel=2)
                continue
            try:
                model = onnx_session(network, shapes, any_size=any_size)
            except Exception as err:  # the exporter raises many types; the columns stay empty
                _warn(runtime, network, err)
                continue
        for batch in BATCHES:
            # What PyTorch cannot run (one image on batch statistics) is not timed elsewhere.
            if runtime != "eager" and "eager" in runtimes and row[f"eager_b{batch}"] == "":
                continue
            try:
                value = throughput(model, shapes, batch, warmup=warmup, reps=reps)
            except Exception as err:  # e.g. batch statistics of a single image
                _warn(f"{runtime} at batch {batch}", network, err)
                continue
            row[f"{column}_b{batch}"] = round(value, 1)
    return row


def _warn(what: str, network: nn.Module, err: Exception) -> None:
    first = (str(err).strip().splitlines() or [""])[0]
    warnings.warn(f"{what}: {type(network).__name__} not measured ({first})", stacklevel=3)


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


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
