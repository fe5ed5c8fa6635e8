"""The zero-shot CLIP teacher (:mod:`kdzoo.models.clip`).

``z_c = s * <v(x) / |v(x)|, w_c>`` with ``w_c`` the normalised prompt-ensembled text embedding
of class ``c`` and the fixed scale ``s = 100``, as in PCoreSet / ActiveKD (Kang et al.,
arXiv:2506.00910; github.com/erjui/PCoreSet, ``train_active_others.py: clip_classifier``), over
CLIP (Radford et al., ICML 2021, arXiv:2103.00020). The student's batch is mapped to CLIP's input
here (:meth:`CLIPZeroShotTeacher.clip_input`). Both CLIP teachers are kdzoo
:class:`~kdzoo.models.teacher.Teacher` s over the frozen image tower: eval mode for ever, no
autograd, never in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.clip.prompts import check_prompts, text_embeddings
from kdzoo.models.teacher import Teacher

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPZeroShotTeacher"]

# OpenAI CLIP's input normalisation (open_clip.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPZeroShotTeacher(Teacher):
    """Zero-shot CLIP classifier over the student's input batch.

    A :class:`~kdzoo.models.teacher.Teacher` whose network (``backbone``, also ``visual``) is
    CLIP's image tower, so it stays frozen and in eval mode for ever (RN50's BatchNorm keeps its
    pretrained statistics); it maps the student's batch to CLIP's input itself
    (:meth:`clip_input`) instead of the affine re-normalisation of a ``Teacher``.

    Args:
        clip_model: an open_clip ``CLIP``/``CustomTextCLIP`` model (its text tower is used once
            here and not kept; the image tower is shared, frozen, not copied).
        tokenizer: the model's open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        class_names: one name per class, in label order.
        templates: prompt templates with one ``{}``.
        logit_scale: fixed logit scale ``s``.
        mean: CLIP's input mean.
        std: CLIP's input std.
        image_size: CLIP's input side; ``None`` reads ``clip_model.visual.image_size``.
        student_mean: the normalisation mean of the batches the teacher receives; ``None``:
            batches are raw pixels in ``[0, 1]``.
        student_std: the matching std.

    Attributes:
        text_weights: ``(C, D)`` L2-normalised class weights ``w_c``.
        raw_text_weights: ``(C, D)`` the template means before normalisation (CLAP's ``W0``).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
        logit_scale: float = 100.0,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        image_size: int | None = None,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
    ) -> None:
        check_prompts(class_names, templates)
        if logit_scale <= 0:
            raise ConfigError(f"clip_teacher.logit_scale must be > 0, got {logit_scale}")
        super().__init__(clip_model.visual)  # frozen, in eval mode
        self.class_names = [str(name) for name in class_names]
        self.logit_scale = float(logit_scale)
        raw = text_embeddings(clip_model, tokenizer, self.class_names, templates)
        # Not persistent: they follow from the model and the prompts, and teachers are never
        # checkpointed (a state dict of this module is the image tower only).
        self.register_buffer("raw_text_weights", raw, persistent=False)
        self.register_buffer("text_weights", F.normalize(raw, dim=-1), persistent=False)
        size = image_size if image_size is not None else clip_model.visual.image_size
        self.image_size: tuple[int, int] = _pair(size)
        self._register_normalisation(mean, std, student_mean, student_std)

    def _register_normalisation(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        student_mean: Sequence[float] | None,
        student_std: Sequence[float] | None,
    ) -> None:
        if (student_mean is None) != (student_std is None):
            raise ConfigError("give both the student's mean and std, or neither")
        s_mean = student_mean if student_mean is not None else (0.0,)
        s_std = student_std if student_std is not None else (1.0,)
        for name, value in (
            ("mean", s_mean),
            ("std", s_std),
            ("clip mean", mean),
            ("clip std", std),
        ):
            if len(value) not in (1, 3):
                raise ConfigError(f"{name} needs 1 or 3 values (grey or RGB), got {tuple(value)}")
        if min(s_std) <= 0 or min(std) <= 0:
            raise ConfigError(f"std values must be > 0, got {tuple(s_std)} and {tuple(std)}")
        for name, value in (("s_mean", s_mean), ("s_std", s_std), ("c_mean", mean), ("c_std", std)):
            tensor = torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(name, tensor, persistent=False)

    @property
    def visual(self) -> nn.Module:
        """CLIP's image tower (the teacher's frozen network)."""
        return self.backbone

    @property
    def num_classes(self) -> int:
        return self.text_weights.shape[0]

    def clip_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch as CLIP's input: pixels, RGB, resized, CLIP-normalised."""
        if x.shape[1] not in (1, 3):
            raise ValueError(f"CLIP teachers take 1- or 3-channel images, got {x.shape[1]}")
        pixels = x.float() * self.s_std + self.s_mean
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = _resize_centre_crop(pixels, self.image_size)
        return (pixels - self.c_mean) / self.c_std

    @torch.no_grad()
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` L2-normalised CLIP image features of the student's batch ``x``."""
        dtype = next(self.visual.parameters()).dtype
        features = self.visual(self.clip_input(x).to(dtype))
        return F.normalize(features.float(), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``s * <features, w_c>`` for L2-normalised ``features``."""
        return self.logit_scale * features @ self.text_weights.t()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` zero-shot logits ``s * cos(v(x), w_c)`` for the student's batch ``x``."""
        return self.logits_from_features(self.image_features(x))


# ---- helpers -----------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _resize_centre_crop(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CLIP's preprocessing on a batch: bicubic resize (shortest side), centre crop, clip to
    the pixel range (bicubic overshoots; the reference's PIL images cannot)."""
    height, width = pixels.shape[-2:]
    if (height, width) == size:
        return pixels
    scale = max(size[0] / height, size[1] / width)
    resized_hw = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    pixels = F.interpolate(pixels, size=resized_hw, mode="bicubic", align_corners=False)
    top = (resized_hw[0] - size[0]) // 2
    left = (resized_hw[1] - size[1]) // 2
    pixels = pixels[..., top : top + size[0], left : left + size[1]]
    return pixels.clamp(0.0, 1.0)
