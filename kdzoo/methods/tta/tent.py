"""``Tent``: test-time entropy minimisation over the normalisation layers' affine parameters.

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation by Entropy
Minimization". ICLR 2021, arXiv:2006.10726; code github.com/DequanWang/tent (``tent.py``:
``configure_model``, ``collect_params``, ``forward_and_adapt``) and the benchmark
github.com/mariodoebler/test-time-adaptation (``methods/tent.py``); kdzoo spec ``tta.md`` section 2.

Follows the benchmark code: BatchNorm uses test-batch statistics (the base class), the trainable
parameters are the affine weight and bias of BatchNorm, LayerNorm and GroupNorm (the official
repo adapts only BatchNorm2d; the benchmark adds LayerNorm and GroupNorm for transformers and
group-norm networks), one optimiser step per batch, the prediction is the batch's logits from
before the step, and there is no reset in the continual setting (the paper reset per domain:
``reset="each_shift"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import softmax_entropy
from kdzoo.methods.tta.base import TTAModule

__all__ = ["Tent", "norm_affine_parameters"]

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine weight and bias of every BatchNorm, LayerNorm and
    GroupNorm of ``model`` (timm's norm layers subclass these), in module order."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for param_name, param in module.named_parameters(recurse=False):
                if param_name in ("weight", "bias"):
                    found.append((f"{module_name}.{param_name}", param))
    return found


class Tent(TTAModule):
    """Minimise the mean softmax entropy of each test batch, updating only normalisation affines.

    Per batch: ``z = f(x)`` (BatchNorm with the batch's statistics), ``L = mean_i H(softmax z_i)``,
    one optimiser step on the norm-layer weights and biases; the prediction is ``z``. Every other
    parameter is frozen (``requires_grad=False``). Benchmark settings: Adam lr 1e-3, batch 200
    (CIFAR); SGD lr 2.5e-4, momentum 0.9, batch 64 (ImageNet).

    Args:
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    citation = (
        'Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation by Entropy '
        'Minimization". ICLR 2021, arXiv:2006.10726'
    )
    description = "entropy minimisation"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model.requires_grad_(False)
        norm_params = norm_affine_parameters(self.model)
        if not norm_params:
            raise ConfigError(
                f"Tent adapts the affine parameters of normalisation layers, but the source model "
                f"{self.model.name!r} has no BatchNorm/LayerNorm/GroupNorm with affine weights"
            )
        for _, param in norm_params:
            param.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for _, param in norm_affine_parameters(self.model)]

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images)
        self.step_optimizer(softmax_entropy(logits))
        return logits.detach()
