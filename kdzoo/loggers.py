"""The logger every ``kdzoo`` run writes with by default."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger

__all__ = ["CSVLogger", "plain"]


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and mappings into dicts, recursively.

    ``hparams.yaml`` is written with ``yaml.dump``, which tags tuples ``!!python/tuple``; such a
    file is then rejected by ``yaml.safe_load`` and by every tool that reads YAML safely.
    """
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger whose ``hparams.yaml`` holds plain YAML (no Python tags)."""

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None) -> None:
        super().log_hyperparams(plain(params) if params is not None else None)
