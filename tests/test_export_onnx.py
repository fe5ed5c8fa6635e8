"""``kdzoo hub export --format onnx``: every family's deployed network as a checked ONNX graph.

One tiny run per family (:mod:`export_helpers`) is exported with ``format="onnx"``; onnxruntime
(CPU) on fresh random batches of several sizes (the batch axis is dynamic; a segmentation net's
height and width too) reproduces the PyTorch module within the export's own tolerance,
``1e-4 x max |output|``. config.json and the card record input size, normalisation and the check;
the card's onnxruntime snippet runs. An export whose graph computes something else is refused
with the max difference and the module and ONNX node where it starts, and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import cli_helpers
import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_helpers import FILTERS, NOT_TIMM
from torch import nn

import kdzoo.hub.export as export_module
from kdzoo.hub.export import ExportError, export_checkpoint
from kdzoo.hub.onnx_export import RELATIVE_TOLERANCE, OnnxError, export_onnx

pytestmark = pytest.mark.filterwarnings(*FILTERS)


@pytest.fixture(scope="module")
def runs(export_runs):
    return export_runs


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("onnx")
    return {f: export_checkpoint(r.ckpt, r.name, base / f, format="onnx") for f, r in runs.items()}


def session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def batch_for(folder: Path, n: int) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``n`` samples of the size the export records (48 x 40 on dynamic
    spatial axes)."""
    onnx = json.loads((folder / "config.json").read_text())["kdzoo"]["onnx"]
    gen = torch.Generator().manual_seed(n)
    sizes = [
        [{"height": 48, "width": 40}.get(d, d) for d in i["shape"][1:]] for i in onnx["inputs"]
    ]
    return tuple(torch.randn(n, *size, generator=gen) for size in sizes)


@pytest.mark.parametrize("family", sorted(NOT_TIMM | {"classification"}))
@pytest.mark.parametrize("n", [1, 3, 5])
def test_onnxruntime_reproduces_the_checkpoint(family, n, runs, exported, record_property) -> None:
    run, folder = runs[family], exported[family]
    inputs = batch_for(folder, n)
    sess = session(folder)
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    (got,) = sess.run(None, feeds)
    want = run.outputs(inputs)
    assert got.shape == tuple(want.shape)
    diff = float(np.abs(got - want.numpy()).max())
    record_property("max_abs_diff", diff)
    assert diff <= RELATIVE_TOLERANCE * float(want.abs().max()), diff


@pytest.mark.parametrize("family", sorted(NOT_TIMM | {"classification"}))
def test_config_and_card_record_the_input_and_the_check(family, runs, exported) -> None:
    folder = exported[family]
    config = json.loads((folder / "config.json").read_text())
    onnx = config["kdzoo"]["onnx"]
    check = onnx["check"]
    assert check["batch_sizes"] == [2, 1]
    assert (
        check["max_abs_diff"]
        <= check["tolerance"]
        == pytest.approx(RELATIVE_TOLERANCE * check["max_abs_output"])
    )
    assert onnx["exporter"] == "torch.onnx.export(dynamo=True)" and onnx["opset"] >= 17
    cfg = config["pretrained_cfg"]
    shape = onnx["inputs"][0]["shape"]
    assert shape[0] == "batch"
    if family == "cross-modal":
        assert shape[1:] == cfg["input_size"] == [10] and "mean" not in cfg
    elif family == "segmentation":
        assert shape[1:] == [3, "height", "width"] and cfg["input_size"] == [3, 32, 32]
    else:
        assert shape[1:] == cfg["input_size"]
        assert cfg["mean"] == list(runs[family].module.mean)
        assert cfg["std"] == list(runs[family].module.std)
    card = (folder / "README.md").read_text()
    assert "## Run with ONNX Runtime" in card and f"{check['max_abs_diff']:.3g}" in card
    if "mean" in cfg:
        assert f"mean {cfg['mean']} and std {cfg['std']}" in card
    snippet = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)[-1]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "<model card>", "exec"), namespace)
    assert namespace["logits"].shape[:2] == (2, config["num_classes"])
    entry = (folder / "manifest_entry.yaml").read_text()
    assert "model.onnx:" in entry and "model.safetensors:" in entry


# ---- refusals -----------------------------------------------------------------------------------


class _Drifts(nn.Module):
    """Identity in PyTorch, x1.5 in the exported graph: an op the exporter gets wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.5 if torch.onnx.is_in_onnx_export() else x


def test_a_graph_that_differs_is_refused_naming_where(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _Drifts(), nn.Linear(8, 3))
    with pytest.raises(OnnxError) as err:
        export_onnx(model, [(4,)], tmp_path / "model.onnx")
    message = str(err.value)
    assert re.search(r"max \|diff\| [0-9.e-]+, above the tolerance", message), message
    assert "first difference at module '2' (_Drifts): ONNX node" in message, message
    assert "(Mul, from aten.mul.Tensor)" in message, message


def test_refused_onnx_export_writes_nothing(runs, tmp_path, monkeypatch) -> None:
    """Through export_checkpoint: an ExportError with the difference, no folder, no leftovers."""
    deployable = export_module._deployable

    def drifting(*args: Any) -> Any:
        found = deployable(*args)
        return dataclasses.replace(found, predictor=nn.Sequential(found.deployed, _Drifts()))

    monkeypatch.setattr(export_module, "_deployable", drifting)
    run = runs["classification"]
    with pytest.raises(ExportError) as err:
        export_checkpoint(run.ckpt, run.name, tmp_path / "out", format="onnx")
    message = str(err.value)
    assert "as ONNX, nothing was written" in message and "max |diff|" in message, message
    assert "first difference at module '1' (_Drifts)" in message, message
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_is_a_clear_error(runs, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    run = runs["classification"]
    with pytest.raises(ExportError, match=r"pip install 'kdzoo\[onnx\]'"):
        export_checkpoint(run.ckpt, run.name, tmp_path / "out", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_refused(runs, tmp_path) -> None:
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_checkpoint(runs["classification"].ckpt, runs["classification"].name,
                          tmp_path / "out", format="tflite")  # fmt: skip


def test_onnx_export_replaces_an_earlier_safetensors_export(runs, tmp_path) -> None:
    run = runs["cross-modal"]
    out = export_checkpoint(run.ckpt, run.name, tmp_path / "out")
    assert not (out / "model.onnx").exists()
    export_checkpoint(run.ckpt, run.name, out, overwrite=True, format="onnx")
    assert (out / "model.onnx").is_file()
    export_checkpoint(run.ckpt, run.name, out, overwrite=True)  # and back
    assert not (out / "model.onnx").exists()


# ---- through the kdzoo command --------------------------------------------------------------


@pytest.mark.slow
def test_cli_onnx_export_prints_the_difference(runs, tmp_path) -> None:
    run = runs["kc"]
    out = tmp_path / "kc"
    args = [f"--ckpt_path={run.ckpt}", f"--name={run.name}", f"--out={out}", "--format=onnx"]
    proc = cli_helpers.kdzoo("hub", "export", *args, cwd=tmp_path)
    assert f"exported {run.name}" in proc.stdout
    match = re.search(r"model\.onnx: max \|onnxruntime - torch\| = ([0-9.e+-]+) on random batches "
                      r"of 2, 1 \(tolerance ([0-9.e+-]+)\)", proc.stdout)  # fmt: skip
    assert match, proc.stdout
    assert float(match.group(1)) <= float(match.group(2))
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()


def test_a_network_on_batch_statistics_is_checked_on_batches_of_2_and_3(tmp_path):
    # Test-time adaptation's BatchNorm without running statistics: a single image whose last
    # feature map is 1x1 cannot go through PyTorch, so the check takes 2 and 3 images instead.
    network = nn.Sequential(
        nn.Conv2d(1, 4, 5), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten()
    )
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        network.eval()(torch.randn(1, 1, 5, 5))
    record = export_onnx(network, [(1, 5, 5)], tmp_path / "model.onnx")
    assert record["check"]["batch_sizes"] == [3, 2]
    x = torch.randn(4, 1, 5, 5)
    got = session_of(tmp_path / "model.onnx").run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), network(x), rtol=1e-4, atol=1e-5)


def session_of(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
