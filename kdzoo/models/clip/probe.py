"""The few-shot CLIP teacher (CLAP linear probe) and its fit; see :mod:`kdzoo.models.clip`.

Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language
Models", CVPR 2024, arXiv:2312.12730, as used by PCoreSet / ActiveKD (arXiv:2506.00910; official
code github.com/erjui/PCoreSet, ``clap_others.py``). Where this follows the code and where it
simplifies is said in :mod:`kdzoo.models.clip`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.models.clip.zero_shot import CLIPZeroShotTeacher
from kdzoo.models.teacher import Teacher

__all__ = ["LinearProbeTeacher", "fit_linear_probe", "linear_warmup_decay"]


class LinearProbeTeacher(Teacher):
    """Few-shot CLIP teacher (CLAP): the zero-shot teacher's image tower with class prototypes.

    A :class:`~kdzoo.models.teacher.Teacher` over the zero-shot teacher (``backbone``, also
    ``zero_shot``): frozen, in eval mode for ever, never in a checkpoint.

    Args:
        zero_shot: supplies the image features, the scale and ``W0`` (its raw text weights).
        prototypes: ``(C, D)`` fitted prototypes; ``None`` starts from ``W0`` (where
            :func:`fit_linear_probe` starts too).
    """

    def __init__(
        self, zero_shot: CLIPZeroShotTeacher, prototypes: torch.Tensor | None = None
    ) -> None:
        super().__init__(zero_shot)
        init = zero_shot.raw_text_weights
        if prototypes is None:
            prototypes = init
        if prototypes.shape != init.shape:
            raise ConfigError(
                f"CLAP prototypes have shape {tuple(prototypes.shape)}, but the CLIP model and "
                f"class names give {tuple(init.shape)} (classes x embedding): were they fitted "
                "with another model or class list?"
            )
        self.register_buffer("prototypes", prototypes.detach().float().clone(), persistent=False)

    @property
    def zero_shot(self) -> CLIPZeroShotTeacher:
        """The zero-shot teacher whose image features the probe classifies."""
        return self.backbone

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def class_names(self) -> list[str]:
        return self.zero_shot.class_names

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``s * <features, P_c / |P_c|>`` for L2-normalised ``features``."""
        return _probe_logits(features, self.prototypes, self.zero_shot.logit_scale)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` CLAP logits for the student's batch ``x``."""
        return self.logits_from_features(self.zero_shot.image_features(x))

    def save_prototypes(self, path: str | Path) -> None:
        """Write the prototypes for :attr:`CLIPTeacherSpec.prototypes` (a plain tensor file)."""
        torch.save({"prototypes": self.prototypes.detach().cpu()}, str(path))


def fit_linear_probe(
    teacher: CLIPZeroShotTeacher | LinearProbeTeacher,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    warmup: float = 0.1,
    generator: torch.Generator | None = None,
) -> LinearProbeTeacher:
    r"""Fit CLAP prototypes on labelled images; returns a new :class:`LinearProbeTeacher`.

    Minimises, by SGD on the prototypes ``P`` only, starting from ``W0`` (every fit restarts
    there, as the reference does in every active-learning round),

    .. math::
        \mathrm{CE}(s \langle \hat v, \hat P_c \rangle, y)
            + \frac{1}{C} \sum_c \lambda_c \lVert P_c - W^0_c \rVert^2,

    with ``lambda_c`` the zero-shot softmax probability of class ``c`` averaged over the
    labelled images of class ``c`` (0 for a class without labelled images).

    Args:
        teacher: the zero-shot teacher (or a probe, whose zero-shot teacher is used).
        images: ``(N, C, H, W)`` labelled images, normalised as the student's batches.
        labels: ``(N,)`` class indices.
        steps: optimiser steps; ``None``: ``300 N / batch_size`` (the reference's 300 passes
            drawn with replacement), at least 1.
        batch_size: images per step, drawn with replacement.
        lr: SGD learning rate (peak of the schedule).
        momentum: SGD momentum.
        warmup: fraction of the steps with linearly increasing learning rate, after which it
            decays linearly to 0.
        generator: random source of the batches.
    """
    zero_shot = teacher.zero_shot if isinstance(teacher, LinearProbeTeacher) else teacher
    labels = labels.long()
    _check_probe_args(images, labels, zero_shot.num_classes, steps, batch_size, warmup)
    n = len(labels)
    steps = steps if steps is not None else max(1, 300 * n // batch_size)
    device = zero_shot.text_weights.device
    features = torch.cat(
        [zero_shot.image_features(chunk.to(device)) for chunk in images.split(batch_size)]
    )
    labels = labels.to(device)
    init = zero_shot.raw_text_weights
    lambdas = _class_adaptive_weights(zero_shot.logits_from_features(features), labels)
    prototypes = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([prototypes], lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(steps, warmup))
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.randint(0, n, (batch_size,), generator=generator).to(device)
            logits = _probe_logits(features[batch], prototypes, zero_shot.logit_scale)
            ce = F.cross_entropy(logits, labels[batch])
            constraint = (lambdas * (prototypes - init).pow(2).sum(dim=1)).mean()
            optimizer.zero_grad()
            (ce + constraint).backward()
            optimizer.step()
            schedule.step()
    return LinearProbeTeacher(zero_shot, prototypes.detach())


def linear_warmup_decay(steps: int, warmup: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor per step for ``LambdaLR``: linear ``0 -> 1`` over the first
    ``warmup * steps`` steps, then linear ``-> 0`` at ``steps``; the schedule of
    ``transformers.get_linear_schedule_with_warmup``, which the reference uses for both the
    student and the CLAP probe."""
    warmup_steps = warmup * steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1.0, warmup_steps)
        return max(0.0, (steps - step) / max(1.0, steps - warmup_steps))

    return factor


# ---- helpers -----------------------------------------------------------------------------------


def _probe_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * features @ F.normalize(prototypes, dim=-1).t()


def _class_adaptive_weights(zero_shot_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLAP's lambda_c: mean zero-shot probability of the true class over class c's images."""
    num_classes = zero_shot_logits.shape[1]
    true_class_prob = zero_shot_logits.softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, true_class_prob)
    counts = torch.bincount(labels, minlength=num_classes).to(sums.dtype)
    return sums / counts.clamp(min=1.0)  # a class without labelled images gets 0


def _check_probe_args(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int | None,
    batch_size: int,
    warmup: float,
) -> None:
    if images.ndim != 4 or len(images) != len(labels) or len(labels) == 0:
        raise ConfigError(
            f"fit_linear_probe needs (N, C, H, W) images and N labels with N >= 1, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes}), got {labels.unique().tolist()}")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"warmup must be in [0, 1), got {warmup}")
