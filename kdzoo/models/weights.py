"""Loading weights without unpickling untrusted data.

Every ``.ckpt``/``.pt``/``.pth`` load in kdzoo goes through :func:`safe_torch_load`, which only
ever calls ``torch.load(..., weights_only=True)``; published artifacts are safetensors.
:func:`load_backbone_state` turns any supported weight file into the state dict of a bare timm
model, so a teacher can come from a kdzoo training run, a safetensors export or a plain
PyTorch state dict.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdzoo.errors import KDZooError

__all__ = ["WeightsError", "load_backbone_state", "safe_torch_load"]

# Prefixes under which kdzoo modules keep their student network; stripped in this order.
# "student." last: a segmentation method's student is a SegmentationModel, not a Backbone.
_STUDENT_PREFIXES = ("student.model.", "model.", "module.", "student.")


class WeightsError(KDZooError, RuntimeError):
    """A weight file is missing, unsafe, or does not fit the model it is loaded into."""


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    Raises:
        WeightsError: the file does not exist, or it holds pickled objects other than tensors
            and primitive containers (which could run arbitrary code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weight file not found: {path} (check the path, it is resolved from "
            f"the current directory {Path.cwd()})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refusing to load {path}: it contains pickled objects that are not plain tensors or "
            f"containers, and unpickling them could run arbitrary code ({err}). Convert it to "
            "safetensors or a plain state dict in a trusted environment first."
        ) from err


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of the bare timm model stored in ``path``.

    Accepts a kdzoo Lightning checkpoint (the student of the run is taken; teachers are never
    saved), a ``.safetensors`` file, or a ``torch.save``-d state dict (optionally under a
    ``"state_dict"`` or ``"model"`` key).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise WeightsError(f"weight file not found: {path}")
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = safe_torch_load(path)
        if isinstance(state, Mapping):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], Mapping):
                    state = state[key]
                    break
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return _strip_prefix(dict(state))


def checkpoint_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a Lightning checkpoint (empty for other files)."""
    path = Path(path)
    if path.suffix != ".ckpt":
        return {}
    state = safe_torch_load(path)
    return dict(state.get("hyper_parameters", {}) or {}) if isinstance(state, Mapping) else {}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STUDENT_PREFIXES:
        keys = [k for k in state if k.startswith(prefix)]
        if keys:
            return {k[len(prefix) :]: state[k] for k in keys}
    return state
