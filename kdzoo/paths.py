"""Where kdzoo keeps what it caches: ``$KDZOO_HOME`` (default ``~/.cache/kdzoo``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["kdzoo_home"]


def kdzoo_home() -> Path:
    """kdzoo's cache root: ``$KDZOO_HOME``, else ``~/.cache/kdzoo`` (hub downloads under
    ``hub/``, class statistics under ``class_stats/``)."""
    return Path(os.environ.get("KDZOO_HOME") or Path.home() / ".cache" / "kdzoo")
