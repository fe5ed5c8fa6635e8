"""The model card (``README.md``) of an exported checkpoint: what it is, where it came from, and
how to load it: with kdzoo, with plain timm when it is a plain timm model, with onnxruntime when
the export has ``model.onnx``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm

import kdzoo.models  # noqa: F401  (registers the CIFAR nets, whose cards need `import kdzoo.models`)

__all__ = ["model_card"]

WEIGHTS_FILE = "model.safetensors"


def model_card(config: Mapping[str, Any], out: Path) -> str:
    """The generated README.md: what the model is, where it came from, how to load it."""
    info = config["kdzoo"]
    network = info.get("network") or {"plain_timm": True}
    lines = _timm_card(config, out) if network["plain_timm"] else _kdzoo_card(config, out)
    if info.get("onnx"):
        lines += _onnx_section(config, out)
    return "\n".join(lines) + "\n"


def _rows(config: Mapping[str, Any]) -> dict[str, str]:
    """The table rows every card has: method, paper, teacher, dataset, classes, input, metrics,
    best of the run (only when known)."""
    info = config["kdzoo"]
    cfg = config["pretrained_cfg"]
    method = info["method"] or "unknown (the checkpoint was not written by `kdzoo fit`)"
    # The method class declares its paper (kdzoo.methods.module.KDZooModule.citation).
    citation = info.get("citation")
    teacher = info["teacher"]
    if teacher:
        weights = teacher.get("weights")
        teacher_text = f"`{teacher['name']}`" + (f" (weights: `{weights}`)" if weights else "")
    else:
        teacher_text = "none"
    dataset = info["dataset"] or "unknown"
    image_size = info["dataset_hparams"].get("image_size")
    if image_size:
        dataset += f" (image_size {image_size})"
    metrics = ", ".join(f"{k} = {v:.4f}" for k, v in info["metrics"].items()) or (
        "not recorded for this checkpoint"
    )
    best = "; ".join(
        f"{k} = {v['score']:.4f} ({v['checkpoint']})" for k, v in info["best_in_run"].items()
    )
    network = info.get("network") or {}
    if "mean" in cfg:
        c, h, w = cfg["input_size"]
        size = f"{c} x {h} x {w}"
        if network.get("any_size"):
            size += " (the training crop; any height and width work)"
        input_text = f"{size}, mean {cfg['mean']}, std {cfg['std']}"
    else:
        shapes = " and ".join(" x ".join(map(str, s)) for s in network.get("inputs", []))
        input_text = (
            f"{shapes} per sample, preprocessed as the dataset's pipeline does (no "
            "normalisation recorded)"
        )
    rows = {
        "method": method,
        "paper": citation or "-",
        "teacher": teacher_text,
        "dataset": dataset,
        "classes": str(config["num_classes"]),
        "input": input_text,
        "metrics": metrics,
    }
    if best:
        rows["best of the run"] = best
    return rows


def _kdzoo_card(config: Mapping[str, Any], out: Path) -> list[str]:
    """The card of a network that is not a plain timm model: kdzoo rebuilds it."""
    info, network = config["kdzoo"], config["kdzoo"]["network"]
    folder = str(out)
    folder_lit, weights_lit = json.dumps(folder), json.dumps(f"{folder}/{WEIGHTS_FILE}")
    config_lit = json.dumps(f"{folder}/config.json")
    module, _, cls = network["built_by"].rpartition(".")
    source = info["source_checkpoint"]
    description = network["description"]
    return [
        f"# {info['name']}",
        "",
        f"{description[0].upper()}{description[1:]}, trained with kdzoo and exported from "
        f"`{source['file']}` (sha256 `{source['sha256']}`).",
        "",
        "**Not a plain timm model**: `timm.create_model` cannot build it. Load it with "
        f"`kdzoo.hub.load({folder_lit})`.",
        "",
        "| | |",
        "|---|---|",
        f"| network | `{network['class']}` over `{network['backbone']}` |",
        *(f"| {key} | {value} |" for key, value in _rows(config).items()),
        "",
        "`model.safetensors` holds this network only (no teacher, no method-only modules, no",
        'optimiser state); `config.json` has `"architecture": null` and a `kdzoo` section with',
        "the method class that rebuilds the network (`kdzoo.network.built_by`) and the",
        "hyper-parameters it rebuilds it from (`kdzoo.method_hparams`).",
        "",
        "## Load with kdzoo",
        "",
        "```python",
        "import kdzoo.hub",
        "",
        f"model = kdzoo.hub.load({folder_lit})  # in eval mode",
        "```",
        "",
        f'Once published in kdzoo\'s manifest: `kdzoo.hub.load("{info["name"]}")`.',
        "",
        "Or rebuild it by hand (what `kdzoo.hub.load` does):",
        "",
        "```python",
        "import json",
        "",
        "from safetensors.torch import load_file",
        "",
        f"from {module} import {cls}",
        "",
        f"with open({config_lit}) as f:",
        "    config = json.load(f)",
        f'deployable = {cls}.deployable(config["kdzoo"]["method_hparams"])',
        f"deployable.network.load_state_dict(load_file({weights_lit}))",
        "model = deployable.deployed.eval()",
        "```",
    ]


def _timm_card(config: Mapping[str, Any], out: Path) -> list[str]:
    """The card of a plain timm model: kdzoo's loader and timm's own recipes."""
    info = config["kdzoo"]
    arch, n = config["architecture"], config["num_classes"]
    cfg = config["pretrained_cfg"]
    c, h, w = cfg["input_size"]
    folder = str(out)
    # Python string literals (json.dumps escapes quotes and backslashes), so the snippets run.
    folder_lit, weights_lit = json.dumps(folder), json.dumps(f"{folder}/{WEIGHTS_FILE}")
    local_dir_lit = json.dumps(f"local-dir:{folder}")
    registered_by_kdzoo = timm.models.model_entrypoint(arch).__module__.startswith("kdzoo.")
    register = [f"import kdzoo.models  # registers {arch} into timm"] if registered_by_kdzoo else []
    source = info["source_checkpoint"]
    lines = [
        f"# {info['name']}",
        "",
        f"A `{arch}` student (timm architecture) trained with kdzoo, exported from "
        f"`{source['file']}` (sha256 `{source['sha256']}`).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{arch}` ({config['num_features']} features) |",
        *(f"| {key} | {value} |" for key, value in _rows(config).items()),
    ]
    lines += [
        "",
        "`model.safetensors` holds the student only (no teacher, no method-only modules, no",
        "optimiser state); `config.json` is timm's hub config plus a `kdzoo` section with the",
        "method's and the dataset's hyper-parameters.",
        "",
        "## Load with kdzoo",
        "",
        "```python",
        "import kdzoo.hub",
        "",
        f"model = kdzoo.hub.load({folder_lit})  # a timm model in eval mode",
        "```",
        "",
        f'Once published in kdzoo\'s manifest: `kdzoo.hub.load("{info["name"]}")`.',
        "",
        "## Load as a plain timm model",
        "",
        "timm reads the folder itself (`config.json` + `model.safetensors`):",
        "",
        "```python",
        "import timm",
        *register,
        f"model = timm.create_model({local_dir_lit}, pretrained=True).eval()",
        "```",
        "",
        "Or name the weight file; `num_classes` must be in the overlay too, otherwise timm",
        "treats the classifier as not matching and silently re-initialises it:",
        "",
        "```python",
        "import timm",
        *register,
        "model = timm.create_model(",
        f'    "{arch}",',
        "    pretrained=True,",
        f"    num_classes={n},",
        f"    in_chans={c},",
        "    pretrained_cfg_overlay=dict(",
        f"        file={weights_lit},",
        f"        num_classes={n},",
        f"        input_size=({c}, {h}, {w}),",
        f"        mean={tuple(cfg['mean'])},",
        f"        std={tuple(cfg['std'])},",
        "    ),",
        ").eval()",
        "```",
        "",
        "Or, with any timm version:",
        "",
        "```python",
        "import timm",
        "from safetensors.torch import load_file",
        *register,
        f'model = timm.create_model("{arch}", num_classes={n}, in_chans={c})',
        f"model.load_state_dict(load_file({weights_lit}))",
        "model.eval()",
        "```",
        "",
        "Preprocessing: `timm.data.resolve_data_config(model=model)` gives the input size and",
        "normalisation above with the first two recipes (kdzoo's loader sets them too).",
    ]
    if registered_by_kdzoo:
        lines += [
            "",
            f"`{arch}` is one of the CIFAR KD-benchmark networks that kdzoo registers into",
            "timm (it is not in timm's own registry): every recipe needs `import kdzoo.models`",
            "first, so kdzoo must be installed; the weights and config are plain timm.",
        ]
    return lines


def _onnx_section(config: Mapping[str, Any], out: Path) -> list[str]:
    """How to run ``model.onnx``, and how it was checked against PyTorch."""
    onnx, cfg = config["kdzoo"]["onnx"], config["pretrained_cfg"]
    check = onnx["check"]
    path_lit = json.dumps(f"{out}/{onnx['file']}")
    feeds, arrays = [], []
    for spec in onnx["inputs"]:
        sizes = ["2" if dim == "batch" else str(dim) for dim in spec["shape"]]
        sizes = ["64" if dim in ("height", "width") else dim for dim in sizes]
        var = "x" if len(onnx["inputs"]) == 1 else f"x_{spec['name'].rsplit('_', 1)[-1]}"
        arrays.append(f"{var} = np.random.randn({', '.join(sizes)}).astype(np.float32)")
        feeds.append(f'"{spec["name"]}": {var}')
    shapes = "; ".join(f"`{s['name']}` {s['shape']}" for s in onnx["inputs"])
    normalised = (
        f"images normalised with mean {cfg['mean']} and std {cfg['std']}"
        if "mean" in cfg
        else "inputs preprocessed as the dataset's pipeline does"
    )
    return [
        "",
        "## Run with ONNX Runtime",
        "",
        f"`{onnx['file']}` (opset {onnx['opset']}, written by `{onnx['exporter']}` with torch "
        f"{onnx['torch_version']}) takes {shapes} ({normalised}) and returns `{onnx['output']}`.",
        f"Checked when exported: random batches of {' and '.join(map(str, check['batch_sizes']))} "
        f"through PyTorch and onnxruntime {onnx['onnxruntime_version']} (CPU) differ by at most "
        f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}, "
        f"{check['relative_tolerance']:g} x the largest output).",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession({path_lit}, providers=["CPUExecutionProvider"])',
        *arrays,
        f"{onnx['output']} = session.run(None, {{{', '.join(feeds)}}})[0]",
        "```",
    ]
