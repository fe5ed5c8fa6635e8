"""Input checks shared by the loss functions."""

from __future__ import annotations

import torch

__all__ = ["check_class_targets"]


def check_class_targets(target: torch.Tensor, n: int, num_classes: int, what: str) -> None:
    """``target`` holds ``n`` integer class indices in ``[0, num_classes)`` (``what`` names the
    tensor they index, for the message)."""
    if target.shape != (n,) or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"target must hold one integer class index per sample, shape ({n},), got "
            f"{target.dtype} of shape {tuple(target.shape)}"
        )
    if n > 0:
        low, high = (int(v) for v in torch.aminmax(target))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"target labels must lie in [0, {num_classes}) for {num_classes}-class {what}, "
                f"got values in [{low}, {high}]"
            )
