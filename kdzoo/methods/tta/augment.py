"""The stochastic test-time augmentation of CoTTA and RMT, and [0,1] <-> normalised conversions.

Wang et al. "Continual Test-Time Domain Adaptation". CVPR 2022, arXiv:2203.13591; code
github.com/qinenergy/cotta (``cifar/my_transforms.py``, ``get_tta_transforms``) and the benchmark
github.com/mariodoebler/test-time-adaptation (``augmentations/transforms_cotta.py``), which RMT
(Döbler et al., CVPR 2023, arXiv:2211.13081) reuses; kdzoo spec ``tta.md`` section 1.4.

Following the code, the whole batch goes through one call of the transform pipeline, so every
random parameter (the colour jitter's order and factors, the affine, the blur's sigma, the flip)
is drawn **once per call and shared by every image of the batch**; only the additive Gaussian
noise is drawn per pixel (spec 1.4, [inferred] from torchvision's batch semantics). The benchmark
feeds the model [0,1] images and normalises inside the model; kdzoo's datamodules normalise, so a
method maps its batch to [0,1] with :func:`to_unit`, augments, and maps back with
:func:`from_unit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

__all__ = ["cotta_augment", "device_generator", "from_unit", "to_unit"]

BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.7, 1.3)
SATURATION = (0.5, 1.5)
HUE = (-0.06, 0.06)
GAMMA = (0.7, 1.3)
DEGREES = (-15.0, 15.0)
TRANSLATE = 1.0 / 16.0
SCALE = (0.9, 1.1)
BLUR_KERNEL = 5
BLUR_SIGMA = (0.001, 0.5)
FLIP_P = 0.5
NOISE_STD = 0.005


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def cotta_augment(images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random CoTTA augmentation of a batch of ``[0, 1]`` images ``(N, C, H, W)``.

    In the code's order: clip to [0,1]; colour jitter in a random order of brightness
    [0.6, 1.4], contrast [0.7, 1.3], saturation [0.5, 1.5], hue [-0.06, 0.06] and gamma
    [0.7, 1.3] (clamped to >= 1e-8 before gamma); edge padding by half the side; random affine
    (rotation +-15 degrees, translation up to 1/16 of the padded side, scale [0.9, 1.1], bilinear,
    fill 0); Gaussian blur (kernel 5, sigma in [0.001, 0.5]); centre crop back to ``(H, W)``;
    horizontal flip with probability 0.5; additive Gaussian noise (std 0.005, per pixel); clip to
    [0,1]. Every parameter except the noise is drawn once and shared by the batch (as the code).

    Saturation and hue need colour: for ``C == 1`` (grey images) their factors are still drawn,
    so the random stream is the same as for colour images, but not applied (torchvision's
    saturation and hue are the identity on one channel anyway). Other ``C`` values are refused.

    Args:
        images01: ``(N, C, H, W)`` float images in [0, 1] (values outside are clipped).
        generator: the random stream (CPU generator, or one on the images' device); ``None``
            uses torch's global stream. The per-pixel noise is drawn on the images' device from a
            generator seeded from ``generator`` when their devices differ.
    """
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(
            f"cotta_augment expects (N, C, H, W) images with C = 1 or 3, "
            f"got shape {tuple(images01.shape)}"
        )
    if not images01.is_floating_point():
        raise ValueError(f"cotta_augment expects float images in [0, 1], got {images01.dtype}")
    height, width = images01.shape[-2:]
    colour = images01.shape[1] == 3
    x = images01.clamp(0.0, 1.0)

    # Colour jitter (ColorJitterPro): a random order, then one factor per adjustment.
    order = torch.randperm(5, generator=generator).tolist()
    brightness = _uniform(*BRIGHTNESS, generator)
    contrast = _uniform(*CONTRAST, generator)
    saturation = _uniform(*SATURATION, generator)
    hue = _uniform(*HUE, generator)
    gamma = _uniform(*GAMMA, generator)
    for index in order:
        if index == 0:
            x = TF.adjust_brightness(x, brightness)
        elif index == 1:
            x = TF.adjust_contrast(x, contrast)
        elif index == 2 and colour:
            x = TF.adjust_saturation(x, saturation)
        elif index == 3 and colour:
            x = TF.adjust_hue(x, hue)
        elif index == 4:
            x = TF.adjust_gamma(x.clamp(1e-8, 1.0), gamma)

    # Pad by half the side (edge), affine on the padded image, blur, crop back.
    pad_h, pad_w = height // 2, width // 2
    x = TF.pad(x, [pad_w, pad_h, pad_w, pad_h], padding_mode="edge")
    padded_h, padded_w = x.shape[-2:]
    angle = _uniform(*DEGREES, generator)
    max_dx, max_dy = TRANSLATE * padded_w, TRANSLATE * padded_h
    translate = [
        float(round(_uniform(-max_dx, max_dx, generator))),
        float(round(_uniform(-max_dy, max_dy, generator))),
    ]
    scale = _uniform(*SCALE, generator)
    x = TF.affine(
        x,
        angle=angle,
        translate=translate,
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=0.0,
    )
    sigma = _uniform(*BLUR_SIGMA, generator)
    x = TF.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
    x = TF.center_crop(x, [height, width])
    if float(torch.rand(1, generator=generator)) < FLIP_P:
        x = TF.horizontal_flip(x)

    noise = torch.randn(
        x.shape, generator=device_generator(generator, x.device), device=x.device, dtype=x.dtype
    )
    return (x + NOISE_STD * noise).clamp(0.0, 1.0)


def device_generator(
    generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """``generator`` if it lives on ``device``, else a generator there seeded from it."""
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _stats(values: Sequence[float] | None, like: torch.Tensor) -> torch.Tensor | None:
    if values is None:
        return None
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def to_unit(
    images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """Normalised images ``(x - mean) / std`` back to ``[0, 1]`` pixel scale: ``x * std + mean``
    (per channel; ``None`` means the images are not normalised and are returned as they are)."""
    mean_t, std_t = _stats(mean, images), _stats(std, images)
    if std_t is not None:
        images = images * std_t
    if mean_t is not None:
        images = images + mean_t
    return images


def from_unit(
    images01: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """The inverse of :func:`to_unit`: ``(x - mean) / std``."""
    mean_t, std_t = _stats(mean, images01), _stats(std, images01)
    if mean_t is not None:
        images01 = images01 - mean_t
    if std_t is not None:
        images01 = images01 / std_t
    return images01
