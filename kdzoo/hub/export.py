"""Export the deployable network of a kdzoo training run as a publishable folder.

A Lightning ``.ckpt`` is for resuming training: it holds optimiser state, teachers' settings,
method-only modules (projectors, fusion nets) and pickled metadata. What gets published is the
network the method declares deployable (:meth:`~kdzoo.methods.module.KDZooModule.deployable`:
the student, or the evaluated network) alone. A plain timm student is written in the format timm
itself reads (the layout of ``timm.models.push_to_hf_hub``), so nobody needs kdzoo, or has to
unpickle anything, to use it:

* ``model.safetensors``: the state dict of ``timm.create_model(architecture, ...)``;
* ``config.json``: timm's hub config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg`` with the input size and normalisation the student was trained with) plus a
  ``kdzoo`` section: method, its hyper-parameters, teacher, dataset, metrics, the network, the
  source checkpoint's sha256;
* ``README.md``: a generated model card with the loading recipes (kdzoo and plain timm);
* ``manifest_entry.yaml``: the entry to paste into ``checkpoints/manifest.yaml`` once the files
  are uploaded;
* ``model.onnx`` with ``format="onnx"``: the deployed network as ONNX, written only once
  onnxruntime has reproduced PyTorch's outputs on a random batch (:mod:`kdzoo.hub.onnx_export`).

Any other network (a segmentation net, KC's student with its FC-SC head, a paired-modality net,
DHO's two-head student, a test-time-adapted model on batch statistics) is written the same way,
its state dict in ``model.safetensors``, but ``config.json`` has ``"architecture": null`` and
``kdzoo.network.built_by`` names the method class whose ``deployable(kdzoo.method_hparams)``
rebuilds it: :func:`kdzoo.hub.load` gives it back, and the card says it is not a timm model.
The export builds it from those recorded hyper-parameters too, so what loads here loads there.

The checkpoint is read with ``torch.load(weights_only=True)`` only
(:func:`~kdzoo.models.weights.safe_torch_load`); the folder is written into a temporary sibling
and renamed into place, so a failed export leaves nothing behind and never half-replaces an
earlier one.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

import kdzoo.models  # noqa: F401  (registers the CIFAR nets, so their names resolve in timm)
from kdzoo.errors import KDZooError
from kdzoo.hub.card import WEIGHTS_FILE, model_card
from kdzoo.hub.export_config import export_config, rebuild_hparams, sha256
from kdzoo.hub.manifest import ManifestError, check_name
from kdzoo.hub.onnx_export import ONNX_FILE, OnnxError, export_onnx
from kdzoo.methods.module import METHOD_KEY, Deployable, KDZooModule
from kdzoo.models.weights import WeightsError, load_strictly, safe_torch_load

__all__ = ["EXPORT_FILES", "FORMATS", "ExportError", "export_checkpoint", "validate_name"]

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
MANIFEST_ENTRY_FILE = "manifest_entry.yaml"
#: Every file an export writes (``format="onnx"`` adds ``model.onnx``); a folder holding only
#: these (and ``model.onnx``) may be replaced with ``overwrite``.
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, MANIFEST_ENTRY_FILE)
_REPLACEABLE_FILES = (*EXPORT_FILES, ONNX_FILE)
#: ``format`` of :func:`export_checkpoint`: the safetensors folder, or that plus ``model.onnx``.
FORMATS = ("safetensors", "onnx")

# timm's tag grammar as kdzoo publishes it: lower-case letters, digits, "_" and "-" (no dots, so
# `arch.tag` splits unambiguously the way timm's split_model_name_tag splits it; no "/", so a
# name is never a path).
_TAG = re.compile(r"[a-z0-9][a-z0-9_-]*")


class ExportError(KDZooError, ValueError):
    """A checkpoint cannot be exported as asked: not a kdzoo run, weights that do not fit the
    network its method declares, a name outside timm's ``arch.tag`` grammar, an output folder
    that holds something an export must not replace, or an ONNX graph that onnxruntime does not
    run as PyTorch does."""


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    format: str = "safetensors",
) -> Path:
    """Write the deployable network of ``ckpt_path`` as a hub folder ``out`` and return ``out``.

    Prints nothing. See the module docstring for the files written.

    Args:
        ckpt_path: a Lightning checkpoint of a kdzoo method (``kdzoo fit``; best, last, or one a
            stopped run left behind).
        name: the published name, ``<architecture>.<tag>`` with the checkpoint's student
            architecture (for a network that is not a plain timm model, the timm backbone it is
            built on), e.g. ``resnet8x4.kd_resnet32x4_cifar100`` (see :func:`validate_name`).
        out: the folder to create. An existing empty folder is filled; a non-empty one is only
            replaced with ``overwrite=True``, and only if it holds nothing but the files of an
            earlier export (:data:`EXPORT_FILES`).
        overwrite: replace an earlier export in ``out``.
        format: ``"safetensors"``, or ``"onnx"`` to add ``model.onnx``, written only if
            onnxruntime reproduces PyTorch's outputs (:mod:`kdzoo.hub.onnx_export`); the check
            is recorded in ``config.json`` under ``kdzoo.onnx``.

    Raises:
        WeightsError: the checkpoint is missing or holds pickled objects other than tensors and
            containers (it is never unpickled beyond ``weights_only=True``).
        ExportError: see :class:`ExportError`.
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    checkpoint = safe_torch_load(ckpt_path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ExportError(
            f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict'): export takes the .ckpt "
            "a `kdzoo fit` run saved under runs/<name>/version_N/checkpoints/"
        )
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path") or checkpoint.get(METHOD_KEY)
    method_cls = _method_class(class_path, ckpt_path)
    method = method_cls.__name__
    deployable = _deployable(method_cls, hparams, ckpt_path)
    if not deployable.timm_model:
        # Built again from the hyper-parameters as config.json records them, which is how
        # kdzoo.hub.load rebuilds it: what is checked here is what a user will get.
        deployable = _deployable(method_cls, rebuild_hparams(hparams), ckpt_path)
    architecture, model_args = deployable.architecture, dict(deployable.model_args)
    validate_name(name, deployable.name_stem)
    _check_destination(out, overwrite)
    try:
        json.dumps(model_args)
    except TypeError as err:
        raise ExportError(
            f"student_kwargs {model_args} of {ckpt_path} are not JSON data, so config.json could "
            f"not rebuild the model ({err})"
        ) from err

    state = _network_state(checkpoint["state_dict"], deployable)
    if not state:
        raise ExportError(f"{ckpt_path} holds no student weights (no '{deployable.prefix}*' keys)")
    if deployable.timm_model:
        _check_fits(deployable.network, state, architecture, method, ckpt_path)
    else:
        try:
            load_strictly(
                deployable.network,
                state,
                what="its weights",
                into=f"the network {method}.deployable rebuilds ({deployable.reason})",
            )
        except WeightsError as err:
            raise ExportError(f"cannot export {ckpt_path}: {err}") from None

    config = export_config(checkpoint, hparams, deployable, name, method_cls, ckpt_path)
    onnx = None
    if format == "onnx":
        onnx = functools.partial(_write_onnx, deployable=deployable, config=config, ckpt=ckpt_path)
    _write_atomically(out, state, config, name, overwrite, onnx)
    return out


def _network_state(
    state_dict: Mapping[str, torch.Tensor], deployable: Deployable
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of the deployable network, its prefix stripped.

    A network kept at the module's root (prefix ``""``, e.g. DHO's backbone and heads) takes only
    the keys of its own top-level submodules, so a teacher, a connector or a projector that the
    checkpoint holds beside it never reaches the export.
    """
    prefix = deployable.prefix
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not prefix:
        own = {key.split(".", 1)[0] for key in deployable.network.state_dict()}
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in own}
    return state


def validate_name(name: str, architecture: str) -> None:
    """Check ``name`` against timm's ``arch.tag`` grammar as kdzoo publishes it.

    The name is ``<architecture>.<tag>``: ``architecture`` is the checkpoint's student (so
    ``timm.create_model(name.split('.')[0])`` builds the right network) and the tag is lower-case
    letters, digits, ``_`` and ``-``, starting with a letter or digit. No ``/``, no further dots
    and no leading dot: a name is also a cache folder and a URL component, never a path.

    Raises:
        ExportError: naming the rule that ``name`` breaks.
    """
    rule = (
        f"a hub name is '<architecture>.<tag>' with the student's architecture {architecture!r} "
        "and a tag of lower-case letters, digits, '_' and '-' (starting with a letter or digit), "
        f"e.g. '{architecture}.kd_resnet32x4_cifar100'"
    )
    if not isinstance(name, str) or not name:
        raise ExportError(f"empty hub name: {rule}")
    problem = None
    if "/" in name or "\\" in name:
        problem = "it contains a path separator"
    elif name.startswith("."):
        problem = "it starts with a dot"
    elif ".." in name:
        problem = "it contains '..'"
    else:
        arch, dot, tag = name.partition(".")
        if not dot:
            problem = "it has no '.<tag>'"
        elif arch != architecture:
            problem = f"its architecture {arch!r} is not the checkpoint's student {architecture!r}"
        elif not _TAG.fullmatch(tag):
            problem = f"its tag {tag!r} has characters outside [a-z0-9_-] or starts with '_'/'-'"
    if problem:
        raise ExportError(f"invalid hub name {name!r}: {problem}; {rule}")
    try:  # the manifest's own check (length limit, ...), so every exported name is publishable
        check_name(name)
    except ManifestError as err:
        raise ExportError(f"{err}; {rule}") from None


# ---- checks ---------------------------------------------------------------------------------


def _check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` whose contents an export would destroy without being asked to."""
    if out.is_symlink():
        raise ExportError(f"output folder {out} is a symbolic link: give the real folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output folder {out} is a file, not a folder: choose a new folder name")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ExportError(
            f"output folder {out} already exists and is not empty ({', '.join(entries[:5])}): "
            "choose a new folder, or pass overwrite=True (`--overwrite`) to replace an earlier "
            "export"
        )
    foreign = [e for e in entries if e not in _REPLACEABLE_FILES]
    if foreign:
        raise ExportError(
            f"output folder {out} holds files an export does not write ({', '.join(foreign[:5])}): "
            "refusing to replace it even with overwrite, so nothing you saved there is lost; "
            "choose a new folder"
        )


def _check_fits(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    architecture: str,
    method: str | None,
    ckpt_path: Path,
) -> None:
    """The student weights load strictly into the bare timm model, else a clear ExportError."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    by = f"{method} replaced it" if method else "the method replaced it"

    def reason(keys: list[str]) -> str:
        if heads and all(any(k.startswith(h + ".") for h in heads) for k in keys):
            return (
                f"The student's classifier ({', '.join(heads)}) is not timm's: {by} with its own "
                "module, so the weights cannot be published as a plain timm model"
            )
        return "The student is not a plain timm model"

    try:
        load_strictly(
            model,
            state,
            what="its student weights",
            into=f"timm.create_model({architecture!r}, num_classes={model.num_classes}, ...)",
            hint=reason,
        )
    except WeightsError as err:
        raise ExportError(f"cannot export {ckpt_path}: {err}") from None


# ---- the method and its network ----------------------------------------------------------------


def _method_class(class_path: Any, ckpt_path: Path) -> type[KDZooModule]:
    """The kdzoo method (a :class:`~kdzoo.methods.module.KDZooModule`, kdzoo's own or a user's)
    that wrote the checkpoint, from the ``_class_path`` LightningCLI records."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise ExportError(
            f"{ckpt_path} does not record which kdzoo method wrote it (no hyper_parameters "
            f"'_class_path', no '{METHOD_KEY}'): export takes the .ckpt of a kdzoo method"
        )
    module, _, attr = class_path.rpartition(".")
    try:
        method_cls = getattr(importlib.import_module(module), attr, None)
    except ImportError as err:
        raise ExportError(
            f"{ckpt_path} was written by {class_path}, which cannot be imported ({err}): run the "
            "export where that module is importable (e.g. from the folder holding it)"
        ) from err
    if not (isinstance(method_cls, type) and issubclass(method_cls, KDZooModule)):
        raise ExportError(
            f"{ckpt_path} was written by {class_path}, which is not a kdzoo method "
            "(a kdzoo.methods.module.KDZooModule)"
        )
    return method_cls


def _deployable(
    method_cls: type[KDZooModule], hparams: Mapping[str, Any], ckpt_path: Path
) -> Deployable:
    """The network the method declares deployable for these hyper-parameters."""
    try:
        return method_cls.deployable(hparams)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(
            f"{ckpt_path}: its hyper-parameters do not describe a {method_cls.__name__} student "
            f"({type(err).__name__}: {err})"
        ) from err
    except NotImplementedError as err:
        raise ExportError(f"cannot export {ckpt_path}: {err}") from err


# ---- writing --------------------------------------------------------------------------------


def _write_atomically(
    out: Path,
    state: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    name: str,
    overwrite: bool,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write the folder into a temporary sibling of ``out``, then rename it into place;
    ``extra(folder)`` adds files (and may update ``config``) before config.json is written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        # clone(): a checkpoint may hold views of one storage, which safetensors refuses.
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config, out))
        (tmp / MANIFEST_ENTRY_FILE).write_text(_manifest_entry(config, tmp, name))
        # mkdtemp (and safetensors) make private files; a published folder gets the usual modes.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        _check_destination(out, overwrite)  # again: something may have appeared meanwhile
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_onnx(
    folder: Path, *, deployable: Deployable, config: dict[str, Any], ckpt: Path
) -> None:
    """``model.onnx`` of the deployed network, checked against PyTorch (see
    :mod:`kdzoo.hub.onnx_export`); the check goes into ``config["kdzoo"]["onnx"]``."""
    try:
        record = export_onnx(
            deployable.deployed,
            config["kdzoo"]["network"]["inputs"],
            folder / ONNX_FILE,
            any_size=deployable.any_size,
        )
    except OnnxError as err:
        raise ExportError(f"cannot export {ckpt} as ONNX, nothing was written: {err}") from err
    config["kdzoo"]["onnx"] = record


def _replace(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` (already checked to be replaceable) is moved
    aside first and only deleted once ``new`` is in place, or moved back if that fails."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _manifest_entry(config: Mapping[str, Any], folder: Path, name: str) -> str:
    """The ``checkpoints/manifest.yaml`` entry for the folder's files, with only the fields
    :class:`~kdzoo.hub.manifest.ManifestEntry` accepts (``urls`` and ``config`` left to fill)."""
    info = config["kdzoo"]
    metrics = {}
    for monitor, value in info["metrics"].items():
        metric = monitor.rsplit("/", 1)[-1]
        # The manifest's table shows top-k accuracy in %, torchmetrics logs it as a fraction.
        metrics[metric] = round(100 * value, 2) if re.fullmatch(r"top\d+", metric) else value
    teacher = info["teacher"]
    entry = {
        "name": name,
        "urls": [],
        "files": {
            f: {"sha256": sha256(folder / f), "size": (folder / f).stat().st_size}
            for f in (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE)
            if (folder / f).is_file()
        },
        # For a network that is not a plain timm model: the timm backbone it is built on.
        "architecture": config["architecture"] or info["network"]["backbone"],
        "num_classes": config["num_classes"],
        "in_chans": config["model_args"].get("in_chans"),
        "metrics": metrics,
        "config": None,
        "method": info["method"],
        "teacher": teacher["name"] if teacher else None,
    }
    header = (
        f"# Manifest entry for {name} (dataset: {info['dataset'] or 'unknown'}), written by\n"
        "# kdzoo.hub.export_checkpoint. To publish: upload model.safetensors and config.json,\n"
        "# list their base URL(s) under `urls` (https://..., hf-hub:org/repo, file:///mirror/...),\n"
        "# set `config` to the configs/ file the run used (or remove it), and add the entry as an\n"
        "# item of `checkpoints:` in checkpoints/manifest.yaml.\n"
        "# metrics: this checkpoint's monitored validation metrics (top-k in %); empty when the\n"
        "# checkpoint (e.g. last.ckpt) does not record its own score.\n"
    )
    if entry["in_chans"] is None:  # not an image network: the manifest's field is optional
        del entry["in_chans"]
    return header + yaml.safe_dump(entry, sort_keys=False)
