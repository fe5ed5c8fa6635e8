"""Loading weights without unpickling untrusted data.

Every ``.ckpt``/``.pt``/``.pth`` load in kdzoo goes through :func:`safe_torch_load`, which only
ever calls ``torch.load(..., weights_only=True)``; published artifacts are safetensors.
:func:`load_backbone_state` turns any supported weight file into the state dict of a bare timm
model, so a teacher can come from a kdzoo training run, a safetensors export or a plain
PyTorch state dict. :func:`load_strictly` is the one place a state dict is loaded into a network:
it loads with ``strict=True`` or says which keys do not fit and why that may be.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.errors import KDZooError

__all__ = [
    "WeightsError",
    "load_backbone_state",
    "load_safetensors",
    "load_strictly",
    "safe_torch_load",
]

# Prefixes under which kdzoo modules keep their student network; stripped in this order.
# "student." last: a segmentation method's student is a SegmentationModel, not a Backbone.
_STUDENT_PREFIXES = ("student.model.", "model.", "module.", "student.")


class WeightsError(KDZooError, RuntimeError):
    """A weight file is missing, unsafe, or does not fit the model it is loaded into."""


def load_strictly(
    network: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    into: str | None = None,
    hint: str | Callable[[list[str]], str] = "",
) -> None:
    """``network.load_state_dict(state, strict=True)``, or a one-line :class:`WeightsError`
    that names the weights, the network, the keys that do not fit and the likely cause.

    Args:
        network: the network to load into.
        state: its state dict, as read from a file.
        what: the weights, as the message's subject, e.g. ``"teacher weights run.ckpt"``.
        into: the network, for the message (default: its class name).
        hint: the likely cause, appended to the message; or a function of the keys that do not
            fit (missing, unexpected and of another shape, sorted) that returns it.

    Raises:
        WeightsError: keys are missing or unexpected, or tensors have other shapes; nothing is
            loaded then.
    """
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in mismatched
        ]
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if keys
        )
        cause = hint(sorted(missing + unexpected + mismatched)) if callable(hint) else hint
        raise WeightsError(
            f"{what} do not fit {into or type(network).__name__}: {details}"
            + (f". {cause}" if cause else "")
        )
    network.load_state_dict(state, strict=True)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    Raises:
        WeightsError: the file does not exist; it is not a ``torch.save`` file (empty, text,
            safetensors, ...), or is truncated or corrupt; or it holds pickled objects other
            than tensors and primitive containers (which could run arbitrary code when
            unpickled). The message is one line naming the file and the problem.
    """
    path = Path(path)
    _check_exists(path)
    problem = _format_problem(path)
    if problem is not None:
        raise WeightsError(f"cannot read {path}: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not any(marker in str(err) for marker in _UNSAFE_MARKERS):
            raise WeightsError(
                f"cannot read {path}: truncated or corrupt PyTorch checkpoint ({_cause(err)})"
            ) from err
        raise WeightsError(
            f"refusing to load {path}: it contains pickled objects that are not plain tensors or "
            f"containers, and unpickling them could run arbitrary code ({_cause(err)}). "
            "Convert it to safetensors or a plain state dict in a trusted environment first."
        ) from err
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError) as err:
        # What torch.load raises for a cut-short legacy file, a damaged zip member, ...
        cause, kind = _cause(err), type(err).__name__
        raise WeightsError(
            f"cannot read {path}: truncated or corrupt PyTorch checkpoint "
            f"({cause if cause == kind else f'{kind}: {cause}'})"
        ) from err


# torch's weights-only unpickler names the global or function it refused; a corrupt stream
# fails on an unknown opcode ("Unsupported operand") or a short read instead.
_UNSAFE_MARKERS = ("GLOBAL", "add_safe_globals", "unrecognized function", "allowlisted")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a pickle (protocol 2+): torch's legacy format
_GENERIC_ADVICE = (
    "Weights only load failed",
    "Check the documentation",
    "Please file an issue",
    "(1)",
    "(2)",
)


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a weight file")
    if not path.is_file():
        raise WeightsError(
            f"weight file not found: {path} (check the path, it is resolved from "
            f"the current directory {Path.cwd()})"
        )


def _format_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file (by its first bytes), or ``None``.

    torch.load reports these as ``KeyError``, ``IndexError: pop from empty list``, ``EOFError``
    or a miniz error that names neither the file nor the cause.
    """
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty (0 bytes): it was not saved completely, or not at all"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return (
                "truncated or corrupt zip archive (a torch.save file cut short, e.g. by an "
                "interrupted copy or download; it has no zip central directory)"
            )
        return None
    if head[0] == _PICKLE_PROTO:
        return None
    if _looks_like_safetensors(head):
        return "it is a safetensors file: give it the .safetensors suffix"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:  # a multi-byte character cut at 4096 bytes is fine
            if err.start < len(head) - 4:
                return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
        return "not a PyTorch checkpoint (it is a text file?)"
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def _looks_like_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


def _cause(err: BaseException) -> str:
    """The specific cause in an exception's message, as one short line (torch's weights-only
    errors wrap it in paragraphs of generic advice)."""
    lines = [line.strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_GENERIC_ADVICE)]
    text = lines[0].removeprefix("WeightsUnpickler error:").strip() if lines else ""
    text = text.split(". ")[0].rstrip(".") or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of the bare timm model stored in ``path``.

    Accepts a kdzoo Lightning checkpoint (the student of the run is taken; teachers are never
    saved), a ``.safetensors`` file, or a ``torch.save``-d state dict (optionally under a
    ``"state_dict"`` or ``"model"`` key).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = safe_torch_load(path)
        if isinstance(state, Mapping):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], Mapping):
                    state = state[key]
                    break
            else:
                if _LIGHTNING_KEYS & set(state):
                    raise WeightsError(
                        f"cannot use {path}: a Lightning checkpoint has no state_dict (keys: "
                        f"{_keys(state)}); give the .ckpt a kdzoo run saved"
                    )
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"cannot use {path}: it holds a {type(state).__name__}, not a state dict of tensors "
            "(a kdzoo/Lightning .ckpt, a .safetensors file or a torch.save-d state dict)"
        )
    if not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(
            f"cannot use {path}: it does not hold a state dict of tensors (keys: {_keys(state)})"
        )
    return _strip_prefix(dict(state))


# Keys every Lightning checkpoint has besides its state_dict.
_LIGHTNING_KEYS = {"pytorch-lightning_version", "hyper_parameters", "optimizer_states", "loops"}


def _keys(state: Mapping) -> str:
    keys = [str(k) for k in state]
    return ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "") if keys else "none"


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or a one-line :class:`WeightsError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_exists(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(
            f"cannot read {path}: not a valid safetensors file, truncated or corrupt "
            f"({_cause(err)})"
        ) from err


def checkpoint_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a Lightning checkpoint (empty for other files)."""
    path = Path(path)
    if path.suffix != ".ckpt":
        return {}
    state = safe_torch_load(path)
    hparams = state.get("hyper_parameters") if isinstance(state, Mapping) else None
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STUDENT_PREFIXES:
        keys = [k for k in state if k.startswith(prefix)]
        if keys:
            return {k[len(prefix) :]: state[k] for k in keys}
    return state
