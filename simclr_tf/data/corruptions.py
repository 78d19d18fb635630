"""Image corruptions at severities 1-5, for shifted target domains (`--train_mode=adapt`).

Four of the CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), with the strengths
that benchmark lists for 32x32 images, written here in NumPy (JPEG through TensorFlow's
encoder): Gaussian noise (standard deviation on [0, 1] pixels), Gaussian blur (sigma in
pixels), contrast (deviations from each channel's mean scaled by a factor) and JPEG
(quality). Every function maps a uint8 (H, W, 3) image and a NumPy generator to a uint8
image; only the noise draws from the generator, so a seed fixes the result.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)
# Strength per severity 1..5 (CIFAR-10-C's values for 32x32 images).
STRENGTHS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg": (80, 65, 58, 50, 40),
}
CORRUPTIONS = tuple(STRENGTHS)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float64) / 255.0
    return _to_uint8(x + rng.normal(scale=std, size=x.shape))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, truncated at 4 sigma (as scipy.ndimage.gaussian_filter)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, sigma: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Separable blur of each channel; edges mirrored (`np.pad(mode="symmetric")`)."""
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    x = image.astype(np.float64) / 255.0
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        length = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return _to_uint8(x)


def contrast(image: np.ndarray, factor: float, rng: np.random.Generator | None = None) -> np.ndarray:
    x = image.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - mean) * factor + mean)


def jpeg(image: np.ndarray, quality: float, rng: np.random.Generator | None = None) -> np.ndarray:
    import tensorflow as tf

    encoded = tf.io.encode_jpeg(tf.constant(image), quality=int(quality))
    return tf.io.decode_jpeg(encoded, channels=3).numpy()


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
}


def corrupt(image: np.ndarray, corruption: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `corruption` at `severity` (1-5)."""
    if corruption not in FUNCTIONS:
        raise ValueError(f"Unknown corruption {corruption!r}: use one of {CORRUPTIONS}.")
    if severity not in SEVERITIES:
        raise ValueError(f"Severity {severity} is not one of {SEVERITIES}.")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"Expected a uint8 (H, W, C) image, got {image.dtype} {image.shape}.")
    return FUNCTIONS[corruption](image, STRENGTHS[corruption][severity - 1], rng)
