"""``config.json`` of an exported folder: timm's hub config for the deployed network (input size,
normalisation, classifier) and kdzoo's provenance section (method and hyper-parameters, teacher,
dataset, metrics, the network and how to rebuild it, the source checkpoint's sha256).

See :mod:`kdzoo.hub.export` for the folder it belongs to.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch

import kdzoo
from kdzoo.methods.module import Deployable, KDZooModule

__all__ = ["export_config", "rebuild_hparams", "sha256"]

# pretrained_cfg keys of timm's default config that describe the architecture or its usual
# preprocessing and still hold for the exported weights (the weight source, licence, paper and
# label fields of timm's own checkpoints do not).
_KEPT_CFG_KEYS = ("interpolation", "crop_pct", "crop_mode", "fixed_input_size", "first_conv")
# Datamodule hyper-parameters giving the training input size, in order of preference.
_SIZE_KEYS = ("image_size", "crop_size", "canvas_size")


def rebuild_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameters as ``config.json`` records them (``kdzoo.method_hparams``:
    JSON data, without the teacher and LightningCLI's ``_`` keys); ``deployable`` of the method
    class rebuilds a network that is not a plain timm model from them."""
    plain = _plain({k: v for k, v in hparams.items() if not k.startswith("_") and k != "teacher"})
    return json.loads(json.dumps(plain))


def export_config(
    checkpoint: Mapping[str, Any],
    hparams: Mapping[str, Any],
    deployable: Deployable,
    name: str,
    method_cls: type[KDZooModule],
    ckpt_path: Path,
) -> dict[str, Any]:
    """timm's hub config for the network, plus kdzoo's provenance section.

    For a network that is not a plain timm model, ``architecture`` is ``null`` and
    ``kdzoo.network`` names the method class whose ``deployable(kdzoo.method_hparams)`` rebuilds
    it (what :func:`kdzoo.hub.load` does).
    """
    model, model_args = deployable.network, dict(deployable.model_args)
    num_classes = int(getattr(model, "num_classes", None) or hparams["num_classes"])
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    data_path = data.get("_class_path")
    data_cls = _kdzoo_class(data_path)
    timm_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if deployable.inputs is not None:  # not images: the datamodule's own preprocessing
        shapes = [[int(s) for s in shape] for shape in deployable.inputs]
        pretrained_cfg: dict[str, Any] = {"num_classes": num_classes}
        if len(shapes) == 1:
            pretrained_cfg["input_size"] = shapes[0]
    else:
        in_chans = int(model_args["in_chans"])
        size, crop_pct = _input_size(data, data_cls, hparams, timm_cfg)
        pretrained_cfg = {k: timm_cfg[k] for k in _KEPT_CFG_KEYS if timm_cfg.get(k) is not None}
        if crop_pct is not None:
            pretrained_cfg["crop_pct"] = crop_pct
            # kdzoo's datamodules resize with albumentations' default, cv2 INTER_LINEAR.
            pretrained_cfg["interpolation"] = "bilinear"
        classifier = timm_cfg.get("classifier")
        if classifier and deployable.timm_model:
            pretrained_cfg["classifier"] = classifier
        pretrained_cfg.update(
            input_size=[in_chans, *size],
            mean=_normalisation(hparams.get("mean"), timm_cfg.get("mean"), in_chans),
            std=_normalisation(hparams.get("std"), timm_cfg.get("std"), in_chans),
            num_classes=num_classes,
        )
        shapes = [pretrained_cfg["input_size"]]
    metrics, best_in_run = _scores(checkpoint, ckpt_path.name)
    teacher = hparams.get("teacher")
    num_features = getattr(model, "num_features", None)
    return {
        "architecture": deployable.architecture or None,
        "num_classes": num_classes,
        "num_features": int(num_features) if isinstance(num_features, int) else None,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "kdzoo": _plain(
            {
                "name": name,
                "method": method_cls.__name__,
                "method_class": hparams.get("_class_path"),
                "citation": method_cls.citation or None,
                "method_hparams": rebuild_hparams(hparams),
                "network": {
                    "plain_timm": deployable.timm_model,
                    "description": deployable.reason or f"a plain timm {deployable.architecture}",
                    "class": f"{type(deployable.deployed).__module__}."
                    f"{type(deployable.deployed).__qualname__}",
                    "backbone": deployable.name_stem,
                    # ``deployable(method_hparams)`` of this class rebuilds the network.
                    "built_by": f"{method_cls.__module__}.{method_cls.__qualname__}",
                    "inputs": shapes,
                    "any_size": deployable.any_size,
                },
                "teacher": dict(teacher) if isinstance(teacher, Mapping) else None,
                "dataset": data_path.rsplit(".", 1)[-1] if isinstance(data_path, str) else None,
                "dataset_class": data_path,
                "dataset_hparams": {k: v for k, v in data.items() if not k.startswith("_")},
                "metrics": metrics,
                "best_in_run": best_in_run,
                "epoch": checkpoint.get("epoch"),
                "global_step": checkpoint.get("global_step"),
                "source_checkpoint": {"file": ckpt_path.name, "sha256": sha256(ckpt_path)},
                "kdzoo_version": kdzoo.__version__,
                "timm_version": timm.__version__,
                "lightning_version": checkpoint.get("pytorch-lightning_version"),
            }
        ),
    }


def _kdzoo_class(class_path: Any) -> type | None:
    """The class a LightningCLI ``_class_path`` names, if it is one of kdzoo's own (a checkpoint
    never makes export import anything else)."""
    if not isinstance(class_path, str) or not class_path.startswith("kdzoo."):
        return None
    module, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def _input_size(
    data: Mapping[str, Any],
    data_cls: type | None,
    hparams: Mapping[str, Any],
    timm_cfg: Mapping[str, Any],
) -> tuple[list[int], float | None]:
    """``[H, W]`` the student was fed, and the eval crop fraction when the datamodule's is known.

    Sources in order: the datamodule's ``image_size`` (``crop_size``, ``canvas_size``)
    hyper-parameter; its class's
    ``native_size`` (kdzoo's small-image datasets, fed whole at their native size when
    ``image_size`` is None); ``student_kwargs['img_size']``; timm's default for the architecture.
    kdzoo datamodules with a fixed native size resize the whole image (crop 1.0); others (e.g.
    ImageFolder) centre-crop as timm does, so timm's default crop is kept for them.
    """
    native = getattr(data_cls, "native_size", None)
    crop_pct = 1.0 if native else None
    # Segmentation datamodules train on crops (``crop_size``; the mosaics' whole canvas).
    given = next((data[k] for k in _SIZE_KEYS if data.get(k)), None)
    size = given or native or (hparams.get("student_kwargs") or {}).get("img_size")
    if size is None:
        return [int(s) for s in timm_cfg.get("input_size", (3, 224, 224))[1:]], crop_pct
    if isinstance(size, int):
        return [size, size], crop_pct
    return [int(s) for s in size], crop_pct


def _normalisation(value: Any, timm_default: Any, in_chans: int) -> list[float]:
    """Per-channel mean or std: the model's hyper-parameter (linked from the datamodule by the
    CLI), else timm's default for the architecture, averaged if its channel count differs."""
    if value is not None:
        values = [float(v) for v in value]
        return values * in_chans if len(values) == 1 and in_chans > 1 else values
    default = [float(v) for v in (timm_default or (0.5,))]
    if len(default) != in_chans:
        default = [sum(default) / len(default)] * in_chans
    return default


def _scores(
    checkpoint: Mapping[str, Any], ckpt_name: str
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Monitored metrics of these weights, and the run's best, from ModelCheckpoint's state.

    A checkpoint only records its own score when it is one of the callback's top-k files (e.g.
    ``best-epochN.ckpt``); ``last.ckpt`` does not, so for it only the run's best score (of
    another file) is known, and it is reported apart, never as this checkpoint's.
    """
    metrics: dict[str, float] = {}
    best: dict[str, dict[str, Any]] = {}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, Mapping):
            continue
        monitor = state.get("monitor")
        if not monitor:
            continue
        for path, score in (state.get("best_k_models") or {}).items():
            if Path(str(path)).name == ckpt_name and _number(score) is not None:
                metrics[monitor] = _number(score)
        score = _number(state.get("best_model_score"))
        if score is not None:
            best[monitor] = {
                "score": score,
                "checkpoint": Path(str(state.get("best_model_path") or "")).name or None,
            }
    return metrics, best


def _number(value: Any) -> float | None:
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy: tuples as lists, scalar tensors as numbers, paths as strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
