"""CLIP prompts: the checks on class names and templates, and the ensembled text embeddings.

Prompt ensembling as in CLIP (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021, arXiv:2103.00020) and the PCoreSet reference
(github.com/erjui/PCoreSet, ``train_active_others.py: clip_classifier``): the mean of the
**un-normalised** text embeddings over templates; see :mod:`kdzoo.models.clip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdzoo.errors import ConfigError

__all__ = ["check_prompts", "text_embeddings"]

_TEXT_CHUNK = 256  # prompts per text-encoder pass


@torch.no_grad()
def text_embeddings(
    clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """``(C, D)`` per class: mean over templates of the un-normalised text embeddings."""
    device = next(clip_model.parameters()).device
    prompts = [t.format(name.replace("_", " ")) for name in class_names for t in templates]
    tokens = tokenizer(prompts)
    # Chunks of prompts (not one class at a time): ImageNet's 1000 x 7 prompts in few passes.
    embeddings = torch.cat(
        [
            clip_model.encode_text(chunk.to(device), normalize=False).float()
            for chunk in tokens.split(_TEXT_CHUNK)
        ]
    )
    return embeddings.view(len(class_names), len(templates), -1).mean(dim=1)


def check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
    """At least one class name and one template, each template with exactly one ``{}``; checked
    before the (slow) model build too."""
    if not class_names:
        raise ConfigError("the CLIP teacher needs at least one class name")
    if not templates:
        raise ConfigError("clip_teacher.templates is empty: give at least one, e.g. 'a {}.'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(
            f"every clip_teacher template needs exactly one '{{}}' for the class name: {bad}"
        )
