"""The CLIP teacher a config describes (:class:`CLIPTeacherSpec`) and its builder.

:func:`build_clip_teacher` loads an :mod:`open_clip` model (optional extra:
``pip install 'kdzoo[clip]'``) and returns the zero-shot teacher, or the few-shot CLAP probe
when the spec names fitted prototypes. CLIP: Radford et al., ICML 2021, arXiv:2103.00020; CLAP:
Silva-Rodríguez et al., CVPR 2024, arXiv:2312.12730; as used by PCoreSet / ActiveKD
(arXiv:2506.00910, github.com/erjui/PCoreSet). See :mod:`kdzoo.models.clip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.clip.probe import LinearProbeTeacher
from kdzoo.models.clip.prompts import check_prompts
from kdzoo.models.clip.zero_shot import CLIP_MEAN, CLIP_STD, CLIPZeroShotTeacher
from kdzoo.models.teacher import RANDOM_INIT
from kdzoo.models.weights import safe_torch_load

__all__ = ["CLIPTeacherSpec", "build_clip_teacher", "check_clip_weights"]


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
    check_prompts(names, spec.templates)
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
