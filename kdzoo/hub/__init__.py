"""The checkpoint hub: export a trained student, publish it in a manifest, download, verify, load.

* :func:`export_checkpoint` turns a kdzoo Lightning checkpoint into a publishable folder
  (``model.safetensors`` with the deployable network only, timm-compatible ``config.json``, a
  model card, a ready-to-paste manifest entry, and optionally a checked ``model.onnx``);
* ``checkpoints/manifest.yaml`` lists the published checkpoints (:mod:`kdzoo.hub.manifest`);
* :func:`download` fetches an entry into ``$KDZOO_HOME/hub/<name>/``, verifying every file's
  sha256 before it is moved into place (:mod:`kdzoo.hub.fetch`); :func:`verify` re-hashes the
  cache;
* :func:`load` returns the network (eval mode) from a local folder or a manifest name: a plain
  timm model, or kdzoo's rebuild of a network that is not one.

Nothing here unpickles: published artifacts are safetensors, and Lightning checkpoints are read
with ``torch.load(weights_only=True)`` (:func:`kdzoo.models.weights.safe_torch_load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from kdzoo.hub.export import export_checkpoint
    from kdzoo.hub.fetch import DownloadError, cache_dir, download, verify
    from kdzoo.hub.loading import load_folder
    from kdzoo.hub.manifest import (
        ManifestEntry,
        ManifestError,
        default_manifest_path,
        read_manifest,
    )

__all__ = [
    "DownloadError",
    "ManifestEntry",
    "ManifestError",
    "cache_dir",
    "default_manifest_path",
    "download",
    "export_checkpoint",
    "load",
    "load_folder",
    "read_manifest",
    "verify",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: a teacher with ``hub:NAME`` weights needs only the downloader
    # (kdzoo.hub.fetch), and ``kdzoo hub list`` only the manifest; neither should pay for the
    # exporter and the model builder, which import timm and kdzoo.models.
    if name == "export_checkpoint":
        from kdzoo.hub import export as module
    elif name in ("DownloadError", "cache_dir", "download", "verify"):
        from kdzoo.hub import fetch as module
    elif name == "load_folder":
        from kdzoo.hub import loading as module
    elif name in ("ManifestEntry", "ManifestError", "default_manifest_path", "read_manifest"):
        from kdzoo.hub import manifest as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def load(name_or_path: str | Path, *, manifest_path: str | Path | None = None) -> nn.Module:
    """A ready network in eval mode (a timm model when the export is one; otherwise the module
    whose forward gives the deployed prediction): from an exported folder (or its
    ``model.safetensors``) when ``name_or_path`` exists on disk, else from the hub entry of that
    name (downloaded and verified once, then served from the cache)."""
    from kdzoo.hub.fetch import download
    from kdzoo.hub.loading import load_folder

    path = Path(name_or_path)
    if path.exists():
        return load_folder(path)
    return load_folder(download(str(name_or_path), manifest_path=manifest_path))
