"""The model card (``README.md``) of an exported checkpoint: what it is, where it came from, and
how to load it with kdzoo or with plain timm."""

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
    arch, n = config["architecture"], config["num_classes"]
    cfg = config["pretrained_cfg"]
    c, h, w = cfg["input_size"]
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
        f"| method | {method} |",
        f"| paper | {citation or '-'} |",
        f"| teacher | {teacher_text} |",
        f"| dataset | {dataset} |",
        f"| classes | {n} |",
        f"| input | {c} x {h} x {w}, mean {cfg['mean']}, std {cfg['std']} |",
        f"| metrics | {metrics} |",
    ]
    if best:
        lines.append(f"| best of the run | {best} |")
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
    return "\n".join(lines) + "\n"
