"""CLIP teachers for vision-language distillation: zero-shot and few-shot linear probe (CLAP).

Both are frozen :mod:`open_clip` image encoders (optional extra: ``pip install 'kdzoo[clip]'``)
that take the *student's* batch, as :class:`~kdzoo.models.teacher.Teacher` does, and return class
logits at a fixed scale:

* :class:`CLIPZeroShotTeacher`: ``z_c = s * <v(x) / |v(x)|, w_c>``, where ``w_c`` is the
  L2-normalised mean over prompt templates of the **un-normalised** text embeddings of class
  ``c`` and ``s = 100``, not the model's own ``logit_scale`` (a randomly initialised model's is
  ``1 / 0.07 = 14.29``).
* :class:`~kdzoo.models.clip_probe.LinearProbeTeacher` (CLAP, Silva-Rodríguez et al., "A Closer
  Look at the Few-Shot Adaptation of Large Vision-Language Models", CVPR 2024, arXiv:2312.12730;
  in :mod:`kdzoo.models.clip_probe`): the text weights are replaced by prototypes ``P`` fitted on
  the labelled images by :func:`~kdzoo.models.clip_probe.fit_linear_probe`,
  ``z_c = s * <v / |v|, P_c / |P_c|>``.

As used by PCoreSet / ActiveKD (Kang et al., "PCoreSet: Effective Active Learning through
Knowledge Distillation from Vision-Language Models", arXiv:2506.00910; official code
github.com/erjui/PCoreSet, ``train_active_others.py: clip_classifier`` and ``clap_others.py``),
whose teacher is OpenAI CLIP RN50.

Where this follows the official code: the prompt ensembling (mean of un-normalised embeddings,
then normalised), the fixed scale 100, the CLAP loss ``CE + mean_c lambda_c |P_c - W0_c|^2`` with
``lambda_c`` the zero-shot probability of the true class averaged over class ``c``'s labelled
images (0 for a class without any), SGD (lr 0.01, momentum 0.9) on ``P`` only with a 10 % linear
warm-up then linear decay, batches of 64 drawn with replacement, ``300 |L| / 64`` steps by default,
last iterate kept. Where it simplifies: the image features for the probe are computed once,
without CLAP's own RandomResizedCrop/flip augmentation (the encoder is frozen, so this turns the
fit into a few milliseconds of matrix products); the CLAP logits use the fixed scale of the spec
(100) rather than the model's ``logit_scale.exp()`` (the two agree for pretrained OpenAI CLIP).
The student's batch is mapped to CLIP's input by undoing the student's normalisation, replicating
a grey channel to RGB, a bicubic resize of the shortest side plus centre crop to CLIP's input size,
and CLIP's mean/std; the reference instead feeds CLIP the same 224-pixel crop the student sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.teacher import RANDOM_INIT
from kdzoo.models.weights import safe_torch_load

if TYPE_CHECKING:  # clip_probe builds on this module
    from kdzoo.models.clip_probe import LinearProbeTeacher

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPTeacherSpec",
    "CLIPZeroShotTeacher",
    "build_clip_teacher",
    "check_clip_weights",
]

# OpenAI CLIP's input normalisation (open_clip.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TEXT_CHUNK = 256  # prompts per text-encoder pass


@dataclass
class CLIPTeacherSpec:
    """Where a CLIP teacher comes from and how it builds its classifier.

    Attributes:
        model: open_clip architecture (``open_clip.list_models()``), e.g. ``"RN50"``.
        pretrained: an open_clip pretrained tag (``"openai"``; needs a network or a filled
            Hugging Face cache), a local file with an open_clip state dict, or ``"random"`` for
            random weights (tests only; ``None`` is an error, as for every kdzoo teacher). A tag
            trained with QuickGELU (all OpenAI tags) turns QuickGELU on; for OpenAI weights
            saved to a local file use e.g. ``"RN50-quickgelu"``.
        class_names: one name per class, in label order; ``None``: the datamodule's
            ``class_names`` (filled in by the distillation module). Underscores become spaces.
        templates: prompt templates with one ``{}`` for the class name; the text embeddings of
            a class are averaged over them.
        logit_scale: the fixed logit scale ``s`` (100 in the reference code).
        mean: input mean CLIP expects (OpenAI CLIP's by default).
        std: input std CLIP expects.
        image_size: side of CLIP's input; ``None``: the model's own (224 for RN50). Smaller
            sizes only make sense for random weights in tests.
        prototypes: a file written by :meth:`LinearProbeTeacher.save_prototypes`; when set the
            teacher is that fitted few-shot (CLAP) probe instead of the zero-shot classifier.
    """

    model: str = "RN50"
    pretrained: str | None = "openai"
    class_names: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    logit_scale: float = 100.0
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    image_size: int | None = None
    prototypes: str | None = None


class _FrozenTeacher(nn.Module):
    """A module that never leaves eval mode and never trains (like kdzoo's ``Teacher``)."""

    def train(self, mode: bool = True) -> _FrozenTeacher:
        # Lightning calls model.train() at every epoch start; CLIP's BatchNorm (RN50) must keep
        # its pretrained statistics.
        return super().train(False)


class CLIPZeroShotTeacher(_FrozenTeacher):
    """Zero-shot CLIP classifier over the student's input batch.

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
        super().__init__()
        _check_prompts(class_names, templates)
        if logit_scale <= 0:
            raise ConfigError(f"clip_teacher.logit_scale must be > 0, got {logit_scale}")
        self.class_names = [str(name) for name in class_names]
        self.logit_scale = float(logit_scale)
        raw = _text_embeddings(clip_model, tokenizer, self.class_names, templates)
        # Not persistent: they follow from the model and the prompts, and teachers are never
        # checkpointed (a state dict of this module is the image tower only).
        self.register_buffer("raw_text_weights", raw, persistent=False)
        self.register_buffer("text_weights", F.normalize(raw, dim=-1), persistent=False)
        self.visual = clip_model.visual
        self.visual.requires_grad_(False)
        size = image_size if image_size is not None else clip_model.visual.image_size
        self.image_size: tuple[int, int] = _pair(size)
        self._register_normalisation(mean, std, student_mean, student_std)
        self.train(False)

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


def build_clip_teacher(
    spec: CLIPTeacherSpec,
    class_names: Sequence[str] | None = None,
    *,
    student_mean: Sequence[float] | None = None,
    student_std: Sequence[float] | None = None,
) -> CLIPZeroShotTeacher | LinearProbeTeacher:
    """Build the frozen CLIP teacher ``spec`` describes.

    Args:
        spec: the teacher's description.
        class_names: used when ``spec.class_names`` is ``None`` (the datamodule's names).
        student_mean: normalisation mean of the batches the teacher will receive.
        student_std: the matching std.

    Raises:
        ConfigError: open_clip is not installed, the model or pretrained weights are unknown or
            cannot be fetched (offline), no class names are known, or the prototypes do not fit.
    """
    check_clip_weights(spec)
    names = spec.class_names if spec.class_names is not None else class_names
    if not names:
        raise ConfigError(
            "the CLIP teacher needs class names for its prompts: set clip_teacher.class_names, "
            "or use a datamodule that has class_names"
        )
    # Before the (slow) model build.
    _check_prompts(names, spec.templates)
    if spec.logit_scale <= 0:
        raise ConfigError(f"clip_teacher.logit_scale must be > 0, got {spec.logit_scale}")
    if spec.image_size is not None and spec.image_size < 32:
        raise ConfigError(f"clip_teacher.image_size must be >= 32 or None, got {spec.image_size}")
    open_clip = _import_open_clip()
    clip_model = _create_clip_model(open_clip, spec)
    teacher = CLIPZeroShotTeacher(
        clip_model,
        open_clip.get_tokenizer(spec.model),
        names,
        templates=spec.templates,
        logit_scale=spec.logit_scale,
        mean=spec.mean,
        std=spec.std,
        image_size=spec.image_size,
        student_mean=student_mean,
        student_std=student_std,
    )
    if spec.prototypes is None:
        return teacher
    stored = safe_torch_load(spec.prototypes)
    prototypes = stored["prototypes"] if isinstance(stored, dict) else stored
    if not torch.is_tensor(prototypes):
        raise ConfigError(f"{spec.prototypes} holds no prototype tensor")
    from kdzoo.models.clip_probe import LinearProbeTeacher

    return LinearProbeTeacher(teacher, prototypes)


def check_clip_weights(spec: CLIPTeacherSpec) -> None:
    """A CLIP teacher names its weights: ``pretrained=None`` is a :class:`ConfigError` (a
    forgotten value must not distil from a random CLIP), ``"random"`` asks for random ones."""
    if not spec.pretrained:
        raise ConfigError(
            "the CLIP teacher has no weights: set clip_teacher.pretrained to an open_clip tag "
            f"(e.g. 'openai') or an open_clip state dict file; `{RANDOM_INIT}` keeps the random "
            "initialisation (for tests only)"
        )


# ---- helpers -----------------------------------------------------------------------------------


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(
            f"the CLIP teacher needs open_clip, which is not installed ({err}): "
            "pip install 'kdzoo[clip]' (or pip install open_clip_torch)"
        ) from err
    return open_clip


def _create_clip_model(open_clip: Any, spec: CLIPTeacherSpec) -> nn.Module:
    if spec.model not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {spec.model!r}: see open_clip.list_models() (e.g. 'RN50', "
            "'ViT-B-32')"
        )
    pretrained = None if spec.pretrained == RANDOM_INIT else spec.pretrained
    tag = open_clip.get_pretrained_cfg(spec.model, pretrained) if pretrained else {}
    if pretrained and not tag and not Path(pretrained).is_file():
        raise ConfigError(
            f"clip_teacher.pretrained={spec.pretrained!r} is neither an open_clip tag of "
            f"{spec.model} ({open_clip.list_pretrained_tags_by_model(spec.model)}) nor an "
            "existing file"
        )
    try:
        model = open_clip.create_model(
            spec.model,
            pretrained=pretrained,
            force_quick_gelu=bool(tag.get("quick_gelu", False)),
            force_image_size=spec.image_size,
        )
    except RuntimeError as err:
        raise ConfigError(
            f"cannot load CLIP {spec.model} weights {spec.pretrained!r}: {err}. Offline, "
            "download them once where there is a network (into the Hugging Face cache, then "
            "set HF_HUB_CACHE) or save a state dict and pass its path as clip_teacher.pretrained"
        ) from err
    return model.eval()


@torch.no_grad()
def _text_embeddings(
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


def _check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
    if not class_names:
        raise ConfigError("the CLIP teacher needs at least one class name")
    if not templates:
        raise ConfigError("clip_teacher.templates is empty: give at least one, e.g. 'a {}.'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(
            f"every clip_teacher template needs exactly one '{{}}' for the class name: {bad}"
        )


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
