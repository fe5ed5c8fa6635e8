"""Load an exported hub folder (``config.json`` + ``model.safetensors``) as a ready network.

The folder is what :func:`kdzoo.hub.export_checkpoint` writes and what a hub download caches.
Nothing is unpickled: the weights are safetensors and the config is JSON. A plain timm model is
built by ``timm.create_model`` (after ``import kdzoo.models``, which registers the CIFAR
KD-benchmark nets), its weights are loaded strictly, and its ``pretrained_cfg`` is set from the
config, so ``timm.data.resolve_data_config(model=model)`` returns the preprocessing it was trained
with. Any other network (``"architecture": null``) is rebuilt by ``deployable(method_hparams)`` of
the kdzoo method class the config names (only kdzoo's own classes, or a module the caller has
imported), and the module returned is the one whose forward gives the deployed prediction.

The module is not called ``load``: a submodule ``kdzoo.hub.load`` would replace the function
:func:`kdzoo.hub.load` on the package the first time it is imported.
"""

from __future__ import annotations

import importlib
import os
import sys
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
    """The network stored in an exported folder, in eval mode: a timm model, or the deployed
    module of a network that is not one (see the module docstring).

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
    network = (config.get("kdzoo") or {}).get("network")
    if architecture is None and isinstance(network, dict) and network.get("plain_timm") is False:
        return _load_kdzoo_network(folder, config, weights)
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


def _load_kdzoo_network(folder: Path, config: dict[str, Any], weights: Path) -> torch.nn.Module:
    """A network that is not a plain timm model, rebuilt by ``deployable(method_hparams)`` of
    the kdzoo method class config.json names, its weights loaded strictly, in eval mode."""
    info = config["kdzoo"]
    network = info["network"]
    method_cls = _method_class(network.get("built_by"), folder / CONFIG_FILE)
    hparams = info.get("method_hparams")
    if not isinstance(hparams, dict):
        raise WeightsError(f"{folder / CONFIG_FILE} has no kdzoo.method_hparams to rebuild from")
    try:
        deployable = method_cls.deployable(hparams)
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(
            f"{folder / CONFIG_FILE}: {method_cls.__name__}.deployable cannot rebuild the network "
            f"from kdzoo.method_hparams ({type(err).__name__}: {err})"
        ) from err
    load_strictly(
        deployable.network,
        load_safetensors(weights),
        what=f"weights {weights}",
        into=f"the {method_cls.__name__} network of config.json ({network.get('description')})",
    )
    model = deployable.deployed
    cfg = dict(config.get("pretrained_cfg") or {})
    for key in ("input_size", "mean", "std"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    cfg["file"] = str(weights)
    model.pretrained_cfg = cfg  # where timm.data.resolve_data_config looks
    return model.eval()


def _method_class(class_path: Any, config: Path) -> type:
    """The kdzoo method class a folder's config names. Only classes of kdzoo itself, or of a
    module the caller has already imported (a user's own method), are used: a downloaded
    config.json never makes kdzoo import anything else."""
    from kdzoo.methods.module import KDZooModule  # here: kdzoo.methods imports kdzoo.hub users

    if not isinstance(class_path, str) or "." not in class_path:
        raise WeightsError(f"{config} names no kdzoo.network.built_by (the method class)")
    module_name, _, attr = class_path.rpartition(".")
    if module_name.split(".", 1)[0] == "kdzoo":
        module = importlib.import_module(module_name)
    elif module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        raise WeightsError(
            f"{config} is rebuilt by {class_path}, which is not part of kdzoo: import "
            f"{module_name} first (kdzoo.hub.load never imports a module a config.json names)"
        )
    method_cls = getattr(module, attr, None)
    if not (isinstance(method_cls, type) and issubclass(method_cls, KDZooModule)):
        raise WeightsError(f"{config} names {class_path}, which is not a kdzoo method class")
    return method_cls


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
