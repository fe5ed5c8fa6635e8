"""A timm model behind one forward pass that returns logits, embedding and intermediate maps.

Every student and teacher in kdzoo is a :class:`Backbone`. It builds the network with
``timm.create_model`` (any registered name, including the CIFAR KD-benchmark nets kdzoo registers)
and runs it once per batch: ``forward_intermediates`` when feature maps are requested, otherwise
``forward_features``, then ``forward_head(pre_logits=True)`` for the pooled embedding and the
classifier for the logits, so a method never pays for a second pass to get features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from kdzoo.errors import ConfigError

__all__ = ["Backbone", "BackboneOutput"]


@dataclass
class BackboneOutput:
    """What one forward pass of a :class:`Backbone` returns.

    Attributes:
        logits: ``(N, num_classes)`` classifier outputs.
        embedding: ``(N, D)`` pooled pre-logits features (what the classifier sees); ``None``
            from a teacher cache, which stores only their norms.
        features: the requested intermediate maps, in the order of the requested indices
            (``NCHW`` for convolutional models; timm's ``forward_intermediates`` layout otherwise).
        embedding_norm: ``(N,)`` norms of the embeddings, given by a teacher cache (see
            :meth:`norms`).
    """

    logits: torch.Tensor
    embedding: torch.Tensor | None
    features: list[torch.Tensor] = field(default_factory=list)
    embedding_norm: torch.Tensor | None = None

    def norms(self) -> torch.Tensor:
        """``(N,)`` embedding norms: stored ones, else computed from the embeddings."""
        if self.embedding_norm is not None:
            return self.embedding_norm
        return self.embedding.norm(dim=1)


class Backbone(nn.Module):
    """A timm classifier exposing logits, embedding and intermediate feature maps in one pass.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``"resnet18"`` or ``"resnet8x4"``.
        num_classes: classifier outputs.
        in_chans: input channels.
        pretrained: load timm's pretrained weights (needs network access or a populated
            Hugging Face cache; the classifier is re-initialised when ``num_classes`` differs).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (``drop_rate``,
            ``drop_path_rate``, ``img_size``, ...).
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_chans: int = 3,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ConfigError(
                f"unknown timm model {name!r}: see `timm.list_models('{name.split('.')[0][:4]}*')` "
                "for names that exist"
            )
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.name = name
        self.model = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            **(model_kwargs or {}),
        )

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def embedding_dim(self) -> int:
        """Width of :attr:`BackboneOutput.embedding` (timm's pre-logits size)."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained config (``mean``, ``std``, ``input_size``, ...)."""
        return dict(getattr(self.model, "pretrained_cfg", {}) or {})

    def feature_channels(self, indices: int | Sequence[int]) -> list[int]:
        """Channels of the intermediate maps that ``forward(x, indices)`` returns."""
        info = self.model.feature_info
        return [info[i]["num_chs"] for i in self._feature_positions(indices)]

    def _feature_positions(self, indices: int | Sequence[int]) -> list[int]:
        """Non-negative feature indices in the order ``forward`` returns their maps."""
        n = len(self.model.feature_info)
        if isinstance(indices, int):  # timm's convention: the last `indices` maps
            return list(range(n - indices, n))
        positions = [i % n if -n <= i < n else None for i in indices]
        if None in positions:
            raise ConfigError(f"feature indices {list(indices)} out of range for {n} stages")
        return positions

    def forward(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> BackboneOutput:
        """Run the network once.

        Args:
            x: ``(N, C, H, W)`` normalised images.
            indices: intermediate maps to return, as timm's ``forward_intermediates`` reads them
                (a sequence of block indices, negative from the end, or an int for the last n).
                ``None`` returns no maps and takes the cheaper ``forward_features`` path.
        """
        features: list[torch.Tensor] = []
        if indices is None:
            final = self.model.forward_features(x)
        else:
            if not hasattr(self.model, "forward_intermediates"):
                raise TypeError(
                    f"timm model {self.name!r} has no forward_intermediates(); "
                    "pick a model that supports it to request intermediate maps"
                )
            positions = self._feature_positions(indices)
            taken = sorted(set(positions))
            # timm returns the maps sorted by depth; hand them back in the order asked for.
            final, maps = self.model.forward_intermediates(x, indices=taken)
            features = [maps[taken.index(i)] for i in positions]
        embedding = self.model.forward_head(final, pre_logits=True)
        head = self.model.get_classifier()
        if isinstance(head, nn.Module):
            # The classifier applied to the pre-logits equals `forward_head(final)` for timm's
            # classifier heads (pool -> norm/dropout -> fc), so we get both from one head pass.
            logits = head(embedding)
        else:  # several heads (e.g. DeiT's distillation token): let timm combine them
            logits = self.model.forward_head(final)
        return BackboneOutput(logits=logits, embedding=embedding, features=features)
