"""ONNX export of a deployed network, kept only if onnxruntime reproduces PyTorch's outputs.

``kdzoo hub export --format onnx`` writes ``model.onnx`` beside ``model.safetensors``. The graph
comes from ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, PyTorch's
default since 2.9; the TorchScript one is deprecated) with a dynamic batch axis (and dynamic
height and width for fully convolutional networks). It is checked on the spot: one seeded random
batch of 2, and its first sample alone (so the dynamic axis is exercised), goes through the
PyTorch module and through an onnxruntime ``CPUExecutionProvider`` session; the export is refused
when ``max |onnx - torch| > 1e-4 * max |torch|`` over both. A refusal names the first module
(in execution order) whose output already differs, and the ONNX node that computes it, found by
exposing every intermediate value of the graph and matching it to the module outputs PyTorch
records (the exporter tags each node with the module path it came from).

onnx, onnxscript and onnxruntime are the ``kdzoo[onnx]`` extra.
"""

from __future__ import annotations

import ast
import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.errors import KDZooError

__all__ = ["ONNX_FILE", "RELATIVE_TOLERANCE", "OnnxError", "export_onnx"]

ONNX_FILE = "model.onnx"
#: The export is refused when ``max |onnx - torch| > RELATIVE_TOLERANCE * max |torch|``.
RELATIVE_TOLERANCE = 1e-4
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx.export(dynamo=True)"
# Node metadata of the dynamo exporter: the module path of each node's scope (["", "layer1",
# "layer1.0", ..., fx node name]) and the matching classes (..., "aten.relu.default").
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"


class OnnxError(KDZooError, ValueError):
    """The ONNX export failed, or onnxruntime does not reproduce PyTorch's outputs."""


def input_names(count: int) -> list[str]:
    """``["input"]`` for one input, ``["input_m1", "input_m2", ...]`` for several."""
    return ["input"] if count == 1 else [f"input_m{i + 1}" for i in range(count)]


def export_onnx(
    model: nn.Module,
    shapes: Sequence[Sequence[int]],
    path: Path,
    *,
    any_size: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``model`` (in eval mode, its weights loaded) as ONNX to ``path`` and check it.

    Args:
        model: the deployed module; ``forward(*inputs)`` returns one tensor.
        shapes: the per-sample shape of each input (without the batch axis).
        path: the ``.onnx`` file to write.
        any_size: the last two axes of every input are dynamic too (fully convolutional nets).
        seed: seed of the random check batch.

    Returns:
        What config.json records: exporter, opset, inputs and output with their axes, the
        versions, and the check (batch sizes, ``max_abs_diff``, ``max_abs_output``,
        ``tolerance``).

    Raises:
        OnnxError: onnx/onnxruntime are missing, the exporter fails, or the check fails (the
            message gives the max difference and, when found, the first module and ONNX node
            that differ). ``path`` may exist afterwards: the caller writes into a scratch folder.
    """
    onnx, ort = _modules()
    model = model.eval()
    names = input_names(len(shapes))
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.randn(3, *map(int, shape), generator=gen) for shape in shapes]
    batches = {2: [x[:2] for x in batch], 1: [x[:1] for x in batch]}
    with torch.no_grad():
        expected = {2: model(*batches[2])}
        try:
            expected[1] = model(*batches[1])
        except (RuntimeError, ValueError):
            # A network normalising with its batch's own statistics (test-time adaptation)
            # cannot take one image whose last feature map is 1x1: check batches of 2 and 3.
            batches = {2: batches[2], 3: batch}
            expected[3] = model(*batch)
    batch = batches[2]
    if not all(torch.is_tensor(out) for out in expected.values()):
        raise OnnxError(
            f"{type(model).__name__}.forward returns {type(expected[2]).__name__}, not a tensor: "
            "ONNX export takes a network returning one tensor"
        )
    _export(model, batch, names, path, any_size)

    session = _session(ort, path.read_bytes())
    diff = scale = 0.0
    for n, inputs in batches.items():
        got = session.run(None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})[0]
        got, want = torch.from_numpy(got), expected[n].float()
        if tuple(got.shape) != tuple(want.shape):
            raise OnnxError(
                f"onnxruntime returns shape {tuple(got.shape)} for a batch of {n}, PyTorch "
                f"{tuple(want.shape)}: the exported graph does not take a dynamic batch"
            )
        diff = max(diff, _max_abs_diff(got, want))
        scale = max(scale, float(want.abs().max()))
    tolerance = RELATIVE_TOLERANCE * scale
    if not diff <= tolerance:
        where = _first_difference(onnx, ort, model, batch, path)
        raise OnnxError(
            f"onnxruntime's outputs differ from PyTorch's by max |diff| {diff:.3g}, above the "
            f"tolerance {tolerance:.3g} ({RELATIVE_TOLERANCE:g} x max |output| {scale:.3g}); "
            + (where or "no single module's output could be matched to the difference")
        )
    return {
        "file": path.name,
        "exporter": EXPORTER,
        "opset": _opset(onnx, path),
        "inputs": [
            {"name": name, "shape": _axes(shape, any_size)}
            for name, shape in zip(names, shapes, strict=True)
        ],
        "output": OUTPUT_NAME,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "check": {
            "batch_sizes": sorted(batches, reverse=True),
            "max_abs_diff": diff,
            "max_abs_output": scale,
            "tolerance": tolerance,
            "relative_tolerance": RELATIVE_TOLERANCE,
        },
    }


def _axes(shape: Sequence[int], any_size: bool) -> list[int | str]:
    """``["batch", C, H, W]``, with ``"height"``/``"width"`` for dynamic spatial axes."""
    dims: list[int | str] = [int(s) for s in shape]
    if any_size and len(dims) >= 3:
        dims[-2:] = ["height", "width"]
    return ["batch", *dims]


def _modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch's dynamo exporter writes through it)
    except ImportError as err:
        raise OnnxError(
            f"--format onnx needs onnx, onnxscript and onnxruntime ({err}): "
            "pip install 'kdzoo[onnx]'"
        ) from err
    return onnx, ort


def _export(
    model: nn.Module, batch: list[torch.Tensor], names: list[str], path: Path, any_size: bool
) -> None:
    dim = torch.export.Dim
    batch_axis = dim("batch", min=1)
    # One Dim object per axis name: every input shares the batch axis.
    spatial = {-2: dim.AUTO, -1: dim.AUTO} if any_size else {}
    dynamic = tuple(
        {0: batch_axis, **{x.dim() + k: v for k, v in spatial.items() if x.dim() >= 3}}
        for x in batch
    )
    # The exporter reports its progress on stdout and warns about its own internals.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                tuple(batch),
                str(path),
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as err:  # the exporter raises many types; all mean the same here
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise OnnxError(
                f"torch.onnx.export (dynamo=True) failed for {type(model).__name__}: "
                f"{type(err).__name__}: {first}"
            ) from err


def _session(ort: Any, model_bytes: bytes) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want|``; a NaN in one of them and not the other counts as infinite."""
    diff = (got.float() - want.float()).abs()
    both_nan = got.isnan() & want.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
    return float(diff.max()) if diff.numel() else 0.0


def _opset(onnx: Any, path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _metadata(node: Any, key: str) -> list[Any]:
    """A list-valued metadata entry of an ONNX node (written as a Python literal), or ``[]``."""
    for prop in node.metadata_props:
        if prop.key == key:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return list(value) if isinstance(value, list | tuple) else []
    return []


def _first_difference(
    onnx: Any, ort: Any, model: nn.Module, batch: list[torch.Tensor], path: Path
) -> str | None:
    """``"first difference at module ... : ONNX node ..."`` for the first module, in the order
    PyTorch completes them (inner before outer), whose output differs beyond the tolerance from
    the ONNX value computed last in that module's scope; ``None`` when none can be matched."""
    recorded: list[tuple[str, nn.Module, torch.Tensor]] = []

    def capture(name: str, module: nn.Module, _: Any, output: Any) -> None:
        if torch.is_tensor(output):  # a copy: a later in-place op (SiLU(inplace)) changes it
            recorded.append((name, module, output.detach().float().clone()))

    hooks = [
        module.register_forward_hook(lambda m, a, o, name=name: capture(name, m, a, o))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for hook in hooks:
            hook.remove()

    proto = onnx.load(str(path))
    last: dict[str, Any] = {}  # module path -> the last node in its scope (graph order)
    for node in proto.graph.node:
        for scope in _metadata(node, _SCOPES_KEY)[1:-1]:  # [root "", modules..., fx node]
            last[scope] = node
    wanted = {last[name].output[0] for name, _, _ in recorded if name in last}
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=v) for v in sorted(wanted - existing))
    try:
        session = _session(ort, proto.SerializeToString())
        names = input_names(len(batch))
        values = session.run(None, {n: x.numpy() for n, x in zip(names, batch, strict=True)})
    except Exception:  # a graph that cannot expose its intermediates: no location then
        return None
    by_name = dict(zip((o.name for o in session.get_outputs()), values, strict=True))
    for name, module, output in recorded:
        node = last.get(name)
        value = by_name.get(node.output[0]) if node is not None else None
        if value is None or tuple(value.shape) != tuple(output.shape):
            continue
        diff = _max_abs_diff(torch.from_numpy(value), output)
        if not diff <= RELATIVE_TOLERANCE * float(output.abs().max()):
            ops = _metadata(node, _CLASSES_KEY)
            origin = f", from {ops[-1]}" if ops and str(ops[-1]).startswith("aten.") else ""
            return (
                f"first difference at module {name!r} ({type(module).__name__}): ONNX node "
                f"{node.name!r} ({node.op_type}{origin}) differs from it by max |diff| {diff:.3g}"
            )
    return None
