"""The 15 common corruptions at the CIFAR-10-C parameters, one function each.

Ported from the reference generator of CIFAR-10-C, ``ImageNet-C/create_c/make_cifar_c.py`` in
``hendrycks/robustness`` (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261): the same formulas and the
same per-severity parameter tables, which are calibrated for 32x32 images. Differences, all
deliberate:

- **randomness** comes from the ``numpy.random.Generator`` passed in (one per image, see
  :func:`kdzoo.corruptions.corrupt`) instead of numpy's global state;
- **motion blur** (``motion_blur`` and the snow layer of ``snow``) replaces ImageMagick's
  ``MagickMotionBlurImage`` (Wand) by the numpy port of its algorithm in ``imagecorruptions``
  (Michaelis et al., "Benchmarking Robustness in Object Detection", arXiv:1907.07484): a one-sided
  Gaussian kernel of width ``2 * radius + 1`` along the angle, edge pixels replicated;
- **glass blur** reproduces what the reference code does, not what its comment says: its
  "swap" ``x[h, w], x[h2, w2] = x[h2, w2], x[h, w]`` of two numpy views copies the neighbour
  into ``x[h, w]`` and leaves the neighbour unchanged;
- **frost** overlays the Hendrycks frost photographs only when ``frost_dir`` names a folder
  holding them (``frost1.png`` ... ``frost6.jpg``; they are not bundled with kdzoo); otherwise a
  procedural stand-in (:func:`procedural_frost`) with the photographs' brightness and contrast;
- **sizes**: the reference hard-codes 32x32; here every spatial quantity uses the image's own
  height and width (the elastic transform scales with the image side, as the reference's
  ``IMSIZE``), so 28x28 Fashion-MNIST images are corrupted directly;
- **grey images** (``C = 1``) are corrupted as one channel, not as three replicated channels that
  are then averaged: noise keeps its full strength (averaging three independent draws would
  divide its standard deviation by sqrt(3)); the colour operations reduce to their grey
  equivalent (HSV brightness on a grey pixel adds ``c`` to it; the frost texture becomes its
  ITU-R 601 luma).

Each function maps a float64 ``H x W x C`` array with values in [0, 255] to a float array of
the same shape, values in [0, 255].
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

Corruption = Callable[..., np.ndarray]
Generator = np.random.Generator

# -- parameters: make_cifar_c.py, severities 1..5 ----------------------------------------------

GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # standard deviation of [0, 1] images
SHOT_NOISE = (500, 250, 100, 75, 50)  # Poisson rate: photons at full intensity
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # share of salt-and-pepper pixels
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, alias
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, d, it
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # radius, sigma
# np.arange exactly as the reference writes it (the first two include their end point).
ZOOM_BLUR = tuple(np.arange(1, end, 0.01) for end in (1.06, 1.11, 1.16, 1.21, 1.26))
# loc, scale, zoom, threshold, blur radius, blur sigma, blend
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image, frost weights
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, fractal decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from the channel mean
# alpha, sigma, affine jitter, in units of the image side
ELASTIC = (
    (0, 0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # down-sampling factor
JPEG_QUALITY = (80, 65, 58, 50, 40)

# The reference crops frost photographs scaled by 0.2 for 32-pixel images.
FROST_SCALE = 0.2
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")

# -- helpers -------------------------------------------------------------------------------------


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0):
    """``skimage.filters.gaussian`` over the two spatial axes (its defaults: nearest, 4 sigma)."""
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _grey(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma ``H x W x 1`` (OpenCV's RGB2GRAY), or the image itself if grey."""
    if x.shape[-1] == 1:
        return x
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]


def disk(radius: float, alias_blur: float = 0.1) -> np.ndarray:
    """Normalised disk kernel, anti-aliased by a small Gaussian blur (as the reference)."""
    side = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = (3, 3) if radius <= 8 else (5, 5)
    xx, yy = np.meshgrid(side, side)
    kernel = np.asarray(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, ksize=ksize, sigmaX=alias_blur)


def plasma_fractal(rng: Generator, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """Diamond-square height map in [0, 1], ``mapsize`` a power of two (reference's fog)."""
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: each square's centre is the mean of its corners plus noise
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squares = corners + np.roll(corners, shift=-1, axis=0)
        squares += np.roll(squares, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squares)
        # diamonds: each diamond's centre is the mean of its corners plus noise
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(top)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def _next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom ``H x W x C`` into its centre by ``factor`` (bilinear), cropped back to ``H x W``."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(img[top : top + ch, left : left + cw], (factor, factor, 1), order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top : trim_top + h, trim_left : trim_left + w]


def motion_blur_kernel(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur as ported by ``imagecorruptions``: the weighted sum of the image
    shifted along ``angle`` (degrees) by 0 .. 2 * radius pixels, weights a one-sided Gaussian."""
    width = 2 * radius + 1
    kernel = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    point = (width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle)))
    hypot = math.hypot(*point)
    h, w = x.shape[:2]
    pad = ((width, width), (width, width)) + ((0, 0),) * (x.ndim - 2)
    padded = np.pad(x, pad, mode="edge")
    blurred = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        dy = -math.ceil(i * point[0] / hypot - 0.5)
        dx = -math.ceil(i * point[1] / hypot - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break  # the shift left the image (as the port; never for these radii and sizes)
        blurred += kernel[i] * padded[width - dy : width - dy + h, width - dx : width - dx + w]
    return blurred


# -- noise ---------------------------------------------------------------------------------------


def gaussian_noise(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    c = GAUSSIAN_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    c = SHOT_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    """``skimage.util.random_noise(mode="s&p")``: each value flipped with probability ``c`` to
    0 or 1 with equal odds."""
    c = IMPULSE_NOISE[severity - 1]
    x = x / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return np.clip(x, 0, 1) * 255


# -- blur ----------------------------------------------------------------------------------------


def defocus_blur(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    radius, alias = DEFOCUS_BLUR[severity - 1]
    kernel = disk(radius, alias_blur=alias)
    x = x / 255.0
    channels = [cv2.filter2D(x[..., k], -1, kernel) for k in range(x.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0, 1) * 255


def glass_blur(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    """Blur, move every inner pixel to a random neighbour within ``d`` (bottom-right to top-left,
    sequentially, ``iterations`` times), blur again."""
    sigma, d, iterations = GLASS_BLUR[severity - 1]
    x = np.uint8(_gaussian(x / 255.0, sigma) * 255)
    h, w = x.shape[:2]
    source = list(range(h * w))  # which original pixel each position now holds
    positions = [(i, j) for i in range(h - d, d, -1) for j in range(w - d, d, -1)]
    for _ in range(iterations):
        # The reference draws (dx, dy) per pixel; drawing them at once is the same stream.
        offsets = rng.integers(-d, d, size=(len(positions), 2)).tolist()
        for (i, j), (dx, dy) in zip(positions, offsets, strict=True):
            source[i * w + j] = source[(i + dy) * w + (j + dx)]
    x = x.reshape(h * w, -1)[source].reshape(h, w, -1)
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def motion_blur(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    radius, sigma = MOTION_BLUR[severity - 1]
    # The reference blurs an 8-bit image and decodes 8-bit pixels; keep that rounding.
    blurred = motion_blur_kernel(x, radius, sigma, rng.uniform(-45, 45))
    return np.clip(np.round(blurred), 0, 255)


def zoom_blur(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    factors = ZOOM_BLUR[severity - 1]
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += clipped_zoom(x, factor)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


# -- weather -------------------------------------------------------------------------------------


def snow(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    x = x.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    layer = rng.normal(size=(h, w), loc=loc, scale=scale)
    layer = clipped_zoom(layer[..., None], zoom)
    layer[layer < threshold] = 0
    # The reference passes the layer through an 8-bit PNG before and after the motion blur.
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)
    layer = motion_blur_kernel(layer, radius, sigma, rng.uniform(-135, -45))
    layer = np.round(np.clip(layer, 0, 255)) / 255.0
    x = blend * x + (1 - blend) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


@lru_cache(maxsize=8)
def _frost_photo(path: str) -> np.ndarray:
    photo = cv2.imread(path, cv2.IMREAD_COLOR)
    if photo is None:
        raise FileNotFoundError(f"cannot read the frost texture {path}")
    return np.ascontiguousarray(photo[..., ::-1])  # BGR -> RGB


def procedural_frost(rng: Generator, h: int, w: int) -> np.ndarray:
    """A stand-in for a crop of the frost photographs: ``H x W x 3`` in [0, 255].

    Ice needles (short bright strokes at random angles, drawn at 4x and reduced) over a plasma
    haze, tinted pale blue. Its statistics match 32-pixel crops of the five photographs the
    reference draws from, scaled by 0.2: mean about 160 of 255, within-crop standard deviation
    about 27 (the photographs: 114..204 and 14..35). On Fashion-MNIST its mean pixel distance
    per severity is within 4% of the photographs'. It is not the photographs, so frost here is
    not exactly the frost of CIFAR-10-C.
    """
    size = _next_power_of_2(max(h, w))
    haze = plasma_fractal(rng, mapsize=size, wibbledecay=2)[:h, :w]
    up = 4
    needles = np.zeros((h * up, w * up), dtype=np.float32)
    for _ in range(int(0.6 * h * w / 16) + 4):
        cy, cx = rng.uniform(0, h * up), rng.uniform(0, w * up)
        length = rng.uniform(2, 7) * up
        angle = rng.uniform(0, math.pi)
        dy, dx = length * math.sin(angle) / 2, length * math.cos(angle) / 2
        start = (round(cx - dx), round(cy - dy))
        end = (round(cx + dx), round(cy + dy))
        cv2.line(needles, start, end, float(rng.uniform(0.5, 1.0)), thickness=2)
    needles = cv2.resize(needles, (w, h), interpolation=cv2.INTER_AREA)
    grey = np.clip(0.45 + 0.3 * haze + 0.55 * needles, 0, 1)
    tint = np.array([0.86, 0.97, 1.06])
    return np.clip(grey[..., None] * tint * 255, 0, 255)


def frost(
    x: np.ndarray, severity: int, rng: Generator, frost_dir: str | None = None, **_
) -> np.ndarray:
    image_weight, frost_weight = FROST[severity - 1]
    h, w = x.shape[:2]
    if frost_dir is None:
        texture = procedural_frost(rng, h, w)
    else:
        # The reference draws randint(5): the sixth photograph is never used.
        photo = _frost_photo(str(Path(frost_dir) / FROST_FILES[rng.integers(5)]))
        scale = max(
            FROST_SCALE * max(h, w) / 32, (h + 1) / photo.shape[0], (w + 1) / photo.shape[1]
        )
        photo = cv2.resize(photo, (0, 0), fx=scale, fy=scale)
        top = rng.integers(0, photo.shape[0] - h)
        left = rng.integers(0, photo.shape[1] - w)
        texture = photo[top : top + h, left : left + w].astype(np.float64)
    if x.shape[-1] == 1:
        texture = _grey(texture)
    return np.clip(image_weight * x + frost_weight * texture, 0, 255)


def fog(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    h, w = x.shape[:2]
    x = x / 255.0
    max_val = x.max()
    haze = plasma_fractal(rng, mapsize=_next_power_of_2(max(h, w)), wibbledecay=decay)
    x = x + strength * haze[:h, :w, None]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def brightness(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    """HSV value + ``c``: with hue and saturation fixed, RGB scales with the value (a black pixel,
    whose saturation is undefined, becomes grey, as in ``skimage.color``)."""
    c = BRIGHTNESS[severity - 1]
    x = x / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.clip(value + c, 0, 1)
    safe = np.where(value > 0, value, 1.0)
    x = np.where(value > 0, x * (new_value / safe), new_value)
    return np.clip(x, 0, 1) * 255


# -- digital -------------------------------------------------------------------------------------


def contrast(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    c = CONTRAST[severity - 1]
    x = x / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    """A random affine jitter of three points, then a smooth random displacement field."""
    h, w = x.shape[:2]
    size = min(h, w)
    alpha, sigma, jitter = (size * v for v in ELASTIC[severity - 1])
    image = (x / 255.0).astype(np.float32)

    centre = np.float32((h, w)) // 2
    half = min(h, w) // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
    matrix = cv2.getAffineTransform(pts1, pts2)
    channels = [
        cv2.warpAffine(image[..., k], matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101)
        for k in range(image.shape[-1])
    ]

    def displacement() -> np.ndarray:
        field = rng.uniform(-1, 1, size=(h, w))
        return (_gaussian(field, sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)

    dx, dy = displacement(), displacement()
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + dy, xx + dx]
    warped = [ndimage.map_coordinates(c, coords, order=1, mode="reflect") for c in channels]
    return np.clip(np.stack(warped, axis=-1), 0, 1) * 255


def _pil(x: np.ndarray) -> Image.Image:
    pixels = np.uint8(x)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64)
    return pixels[..., None] if channels == 1 else pixels


def pixelate(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    c = PIXELATE[severity - 1]
    h, w, channels = x.shape
    image = _pil(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return _array(image.resize((w, h), Image.Resampling.BOX), channels)


def jpeg_compression(x: np.ndarray, severity: int, rng: Generator, **_) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(x).save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    return _array(Image.open(buffer), x.shape[-1])


FUNCTIONS: dict[str, Corruption] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        snow,
        frost,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
    )
}
