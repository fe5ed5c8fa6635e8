"""Structurally connected (SC) classifier head with a per-vertical logit scale.

Gao, Guo, Li, Nevatia. "Knowledge Concentration: Learning 100K Object Classifiers in a Single
CNN". arXiv:1711.07607, 2017. No official code exists; the layers follow the kdzoo spec
(``specs/classification.md``, sections 5.3 and 5.4), reconstructed from a third-party summary.

The head replaces a timm model's classifier and reads its pooled embedding (width ``s_b``).
Variant (b) of the paper, ``FC(s1) -> SC(s2)`` (its best, e.g. FC4096-SC512): one shared
``Linear(s_b, s1) + ReLU``, then for each vertical ``m`` its own ``Linear(s1, s2) + ReLU`` block
feeding only that vertical's ``N_m`` output units, so output units of vertical ``m`` connect only
to vertical ``m``'s hidden units. Variant (a), ``FC(s1) -> FC(s2)``, is the plain baseline.
Parameter counts, weights only (spec 5.3; biases add ``s1 + s2 + N`` for (a) and
``s1 + s2 M + N`` for (b), the scale adds ``M`` or ``N`` learnable gammas)::

    (a) s_b s1 + s1 s2 + s2 N          (b) s_b s1 + s1 s2 M + s2 N

"Self-paced learning" (spec 5.4) is a scale layer, not a sample schedule: each vertical's logit
vector is L2-normalised over its ``N_m`` logits and multiplied by ``gamma_m``, learnable and
initialised at ``sqrt(N_m)`` (the paper's best; the summary motivates it by the logit gradient
scaling like ``1 / sqrt(N_m)``). The summary does not say whether the gammas were initialised
with noise ("variance 1e-3"); here they start exactly at ``sqrt(N_m)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError

__all__ = ["SCHead"]

Structure = Literal["sc", "fc"]
Scale = Literal["vertical", "class", "fixed", "none"]


class SCHead(nn.Module):
    """Classifier head over a pooled embedding with per-vertical blocks and logit scales.

    Logits come out in global class order: output ``j`` of vertical ``m`` is class
    ``verticals[m][j]``.

    Args:
        in_features: embedding width ``s_b``.
        verticals: the global class indices of each vertical; together they must be exactly
            ``0..N-1`` (a partition).
        hidden: ``(s1, s2)``: width of the shared first layer and of each vertical's hidden
            block (``"sc"``) or of the single second layer (``"fc"``).
        structure: ``"sc"``: variant (b) FC(s1)-SC(s2); ``"fc"``: variant (a) FC(s1)-FC(s2).
        scale: ``"vertical"``: ``y = gamma_m x / ||x||`` over each vertical's logits ``x``, one
            learnable ``gamma_m`` per vertical initialised at ``sqrt(N_m)`` (the paper's best);
            ``"class"``: the same normalisation with one learnable gamma per class, each
            initialised at its vertical's ``sqrt(N_m)``; ``"fixed"``: ``gamma_m = sqrt(N_m)``,
            not learned; ``"none"``: raw logits.
    """

    def __init__(
        self,
        in_features: int,
        verticals: Sequence[Sequence[int]],
        hidden: Sequence[int] = (256, 64),
        *,
        structure: Structure = "sc",
        scale: Scale = "vertical",
    ) -> None:
        super().__init__()
        if structure not in ("sc", "fc"):
            raise ConfigError(f"head must be 'sc' or 'fc', got {structure!r}")
        if scale not in ("vertical", "class", "fixed", "none"):
            raise ConfigError(
                f"scale must be 'vertical', 'class', 'fixed' or 'none', got {scale!r}"
            )
        if len(hidden) != 2 or min(hidden) < 1:
            raise ConfigError(f"hidden must be two widths [s1, s2] >= 1, got {list(hidden)}")
        order = [int(c) for vertical in verticals for c in vertical]
        if (
            not verticals
            or min(len(v) for v in verticals) == 0
            or sorted(order) != list(range(len(order)))
        ):
            raise ConfigError(
                f"verticals must be non-empty lists partitioning 0..N-1, got {verticals}"
            )
        s1, s2 = (int(h) for h in hidden)
        self.sizes = [len(v) for v in verticals]
        self.structure = structure
        self.scale = scale
        self.shared = nn.Sequential(nn.Linear(in_features, s1), nn.ReLU())
        if structure == "sc":
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(s1, s2), nn.ReLU(), nn.Linear(s2, n)) for n in self.sizes
            )
        else:  # one block whose outputs are the verticals' logits one after the other
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(s1, s2), nn.ReLU(), nn.Linear(s2, len(order)))]
            )
        # Position of each global class in the concatenated per-vertical outputs. Not persistent:
        # it follows from the config.
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        self.register_buffer("inverse_order", inverse, persistent=False)
        root = torch.tensor([math.sqrt(n) for n in self.sizes])
        if scale == "vertical":
            self.gamma = nn.Parameter(root)
        elif scale == "class":
            self.gamma = nn.Parameter(root.repeat_interleave(torch.tensor(self.sizes)))
        elif scale == "fixed":
            self.register_buffer("gamma", root, persistent=False)
        else:
            self.gamma = None

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    def vertical_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each vertical's ``(B, N_m)`` logits after the scale layer, in vertical order."""
        hidden = self.shared(x)
        if self.structure == "sc":
            logits = [block(hidden) for block in self.blocks]
        else:
            logits = list(self.blocks[0](hidden).split(self.sizes, dim=1))
        if self.gamma is None:
            return logits
        gammas = self.gamma.split(self.sizes) if self.scale == "class" else self.gamma
        # Each vertical is normalised over its own N_m logits only, so the scale layer keeps the
        # verticals independent (spec 5.4; a norm over all N logits would couple them).
        return [F.normalize(z, dim=1) * g for z, g in zip(logits, gammas, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` logits in global class order from ``(B, s_b)`` embeddings."""
        return torch.cat(self.vertical_logits(x), dim=1)[:, self.inverse_order]

    def extra_repr(self) -> str:
        return f"structure={self.structure!r}, scale={self.scale!r}, verticals={self.sizes}"
