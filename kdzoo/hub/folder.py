"""The files of an exported hub folder, and its ``config.json`` read without building a model.

Below both :mod:`kdzoo.hub.loading` (which builds the timm model) and
:mod:`kdzoo.models.teacher` (which reads a folder's architecture and mean/std for a
``weights: hub:NAME`` teacher), so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdzoo.models.weights import WeightsError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "read_config"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in an exported folder's ``config.json``, or a one-line
    :class:`WeightsError` naming the file."""
    if not path.is_file():
        raise WeightsError(f"{path} not found: an exported folder has a {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(
            f"cannot read {path.parent}: {CONFIG_FILE} is not valid JSON ({path}: {err})"
        ) from err
    if not isinstance(config, dict):
        raise WeightsError(
            f"cannot read {path.parent}: {CONFIG_FILE} does not hold a JSON object ({path})"
        )
    return config
