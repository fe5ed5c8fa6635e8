"""A quiet CPU ``lightning.Trainer`` for in-process tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def quiet_trainer(root: str | Path, **kwargs: Any) -> L.Trainer:
    """CPU, no logger, no progress bar or model summary, files under ``root``; ``kwargs`` add to
    or override these."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        "accelerator": "cpu",
    }
    return L.Trainer(**{**defaults, **kwargs})
