"""``Source``: the source model as it is, without adaptation (the benchmark's "source" row)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from kdzoo.methods.tta.base import TTAModule

__all__ = ["Source"]


class Source(TTAModule):
    """No adaptation: the source model with its own BatchNorm running statistics.

    Args:
        batch_norm: ``"source"`` (default) keeps the running statistics; ``"batch"`` is
            :class:`~kdzoo.methods.tta.BNAdapt`.
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    description = "the source model, not adapted"

    def __init__(self, batch_norm: Literal["batch", "source"] = "source", **kwargs: Any) -> None:
        super().__init__(batch_norm=batch_norm, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)
