"""Load an exported hub folder (``config.json`` + ``model.safetensors``) as a plain timm model.

The folder is what :func:`kdzoo.hub.export_checkpoint` writes and what a hub download caches.
Nothing is unpickled: the weights are safetensors and the config is JSON. The model is built by
``timm.create_model`` (after ``import kdzoo.models``, which registers the CIFAR KD-benchmark
nets), its weights are loaded strictly, and its ``pretrained_cfg`` is set from the config, so
``timm.data.resolve_data_config(model=model)`` returns the preprocessing it was trained with.

The module is not called ``load``: a submodule ``kdzoo.hub.load`` would replace the function
:func:`kdzoo.hub.load` on the package the first time it is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch

import kdzoo.models  # noqa: F401  (registers the CIFAR nets, so their names resolve in timm)
from kdzoo.hub.folder import CONFIG_FILE, WEIGHTS_FILE, read_config
from kdzoo.models.weights import WeightsError, load_safetensors, load_strictly

__all__ = ["load_folder"]

# Fields of timm's default config that describe timm's own weights (where they are, their labels,
# their test-time resolution), not the exported ones; dropped unless config.json sets them.
_FOREIGN_KEYS = (
    "url",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "tag",
    "license",
    "label_names",
    "label_descriptions",
    "label_offset",
    "test_input_size",
    "test_crop_pct",
    "test_pool_size",
)


def load_folder(path: str | os.PathLike) -> torch.nn.Module:
    """The timm model stored in an exported folder, in eval mode.

    Args:
        path: the folder, or its ``model.safetensors`` (``config.json`` must be beside it).

    Raises:
        WeightsError: the folder or one of its files is missing or unreadable, the config names
            no (or an unknown) architecture, or the weights do not fit the architecture (the
            message names the keys).
    """
    path = Path(path)
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_FILE
    elif path.is_file() and path.suffix == ".safetensors":
        folder, weights = path.parent, path
    elif path.exists():
        raise WeightsError(
            f"{path} is neither a hub folder nor a .safetensors file: give the exported folder "
            f"(with {CONFIG_FILE} and {WEIGHTS_FILE}) or its {WEIGHTS_FILE}"
        )
    else:
        raise WeightsError(
            f"hub folder not found: {path} (resolved from the current directory {Path.cwd()})"
        )
    config = read_config(folder / CONFIG_FILE)
    if not weights.is_file():
        raise WeightsError(f"{folder} has no {weights.name}: the export is incomplete")

    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise WeightsError(
            f"{folder / CONFIG_FILE} names no 'architecture' (the timm model to build)"
        )
    if not timm.is_model(architecture):
        raise WeightsError(
            f"{folder / CONFIG_FILE} names architecture {architecture!r}, which is not a timm "
            f"model (timm {timm.__version__}, with kdzoo's CIFAR nets registered)"
        )
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    model_args = dict(config.get("model_args") or {})
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is None:
        raise WeightsError(f"{folder / CONFIG_FILE} gives no 'num_classes'")
    input_size = pretrained_cfg.get("input_size")
    if "in_chans" not in model_args and input_size:
        model_args["in_chans"] = int(input_size[0])

    model = timm.create_model(
        architecture, pretrained=False, num_classes=int(num_classes), **model_args
    )
    state = load_safetensors(weights)
    load_strictly(
        model,
        state,
        what=f"weights {weights}",
        into=f"timm model {architecture!r} as config.json describes it",
    )
    _set_pretrained_cfg(model, pretrained_cfg, architecture, weights)
    return model.eval()


def _set_pretrained_cfg(
    model: torch.nn.Module, cfg: dict[str, Any], architecture: str, weights: Path
) -> None:
    """The exported preprocessing on the model, where timm's data helpers look for it."""
    merged = {k: v for k, v in dict(model.pretrained_cfg or {}).items() if k not in _FOREIGN_KEYS}
    merged.update(cfg)
    for key in ("input_size", "mean", "std", "test_input_size", "min_input_size", "pool_size"):
        if isinstance(merged.get(key), list):  # JSON lists -> tuples, as timm's own cfgs
            merged[key] = tuple(merged[key])
    merged["architecture"] = architecture
    merged["file"] = str(weights)
    model.pretrained_cfg = merged
    model.default_cfg = merged  # timm keeps the old name as an alias
