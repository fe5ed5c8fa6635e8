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

Throughput is measured on a finished suite by ``tools/bench_cost.py``
(:func:`kdzoo.cost_suite.measure_suite`, which rebuilds each run's network from its log folder),
on a quiet machine, never by the training run: training loads the machine, and a number measured
there says little. A suite's active-learning part (``<out>/<suite>_active``) adds one row per
selection strategy, named after it (:func:`kdzoo.cost_suite.measure_active`: every round trains
the same student network). The rows go to ``benchmarks/<suite>_cost.csv``
(:data:`kdzoo.results.COST_FIELDS`), which the result tables join by run name, a pivot table of
the rounds by strategy (:func:`kdzoo.results.read_cost`, ``render_table(cost=...)``,
``render_pivot(cost=...)``).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdzoo.errors import KDZooError

__all__ = [
    "BATCHES",
    "RUNTIMES",
    "CostError",
    "count_macs",
    "count_parameters",
    "cpu_name",
    "measure",
    "onnx_session",
    "onnxruntime_version",
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


# ---- one network ------------------------------------------------------------------------------


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
