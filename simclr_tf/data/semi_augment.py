"""Weak and strong augmentations for the semi-supervised train modes (FixMatch, UDA, ...).

Both are pure functions of (image, seed): they draw only from TensorFlow's stateless
random ops, seeded by a shape-[2] integer tensor, so a run resumed mid-epoch rebuilds
exactly the same augmented batches, eagerly or inside `tf.data.Dataset.map`.

- weak: the image to (S, S) (centre square of the whole shorter side, resized), a
  left-right flip with probability 1/2, and a shift of up to round(translate_fraction
  * S) pixels along each axis by reflect-padding and a random crop (FixMatch's
  flip-and-shift).
- strong: an independent weak draw, then RandAugment with a random magnitude per op
  (FixMatch's "RA" variant): `num_ops` ops drawn uniformly with replacement from
  `RANDAUGMENT_OPS`, each at a value uniform in its range, then Cutout: a grey (0.5)
  square of side round(cutout_fraction * S) centred uniformly, clipped at the border.
  The 14 ops are FixMatch's (google-research/fixmatch `libml/augment.py`), their ranges
  USB's FixMatch RandAugment (`semilearn/datasets/augmentation/randaugment.py`), each
  op defined as PIL's; pixels uncovered by geometric ops are grey, as in FixMatch.

Why not `keras.layers.RandAugment` / `RandomErasing` (Keras 3.15.1): their `seed`
arguments take a Python int or a SeedGenerator, not a per-example tensor, and
RandAugment's `get_random_transformation` ignores its `seed` altogether, so the same
pipeline run twice gives different images (no exact resume). RandAugment also computes
all 11 ops at each of its `num_ops` steps and keeps one with `where`, and its single
`factor` gives one-sided ranges (at the default 0.5: rotations of 0 to 180 degrees,
shifts of 0 to +50%, brightness only up). Measured in tf.data on CIFAR-10 (2
CPU cores shared with other jobs, tools/benchmark_augment.py, two runs), CPU time per
image, ours vs Keras: weak 71-73 vs 113-119 us, strong (RandomErasing as Cutout)
238-288 vs 1922-1948 us, i.e. 6.7-8.2x less for strong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from simclr_tf.data.augment import center_crop, ensure_rgb, to_float, to_grayscale

# Grey used by Cutout and for the pixels a geometric op brings in (FixMatch's choice).
FILL_VALUE = 0.5
# PIL's SMOOTH kernel, which PIL's Sharpness enhancer blends with.
_SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))

# The code has no Python control flow on tensors, so AutoGraph has nothing to convert;
# skipping it cut building a tf.data map of `strong_augment` from 5.6 s to 1.6 s (loaded CPU).
_no_autograph = tf.autograph.experimental.do_not_convert

# Independent random streams folded out of the caller's seed.
_WEAK_FLIP, _WEAK_SHIFT, _STRONG_WEAK, _CUTOUT, _RANDAUGMENT = range(5)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, clipped to [0, 1]."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _affine(image: tf.Tensor, matrix: Sequence[tf.Tensor | float]) -> tf.Tensor:
    """Output pixel (x, y) takes input pixel (a x + b y + c, d x + e y + f), nearest, grey fill.

    `matrix` = (a, b, c, d, e, f) as PIL's Image.AFFINE data; x is the column.
    """
    transform = tf.cast(tf.stack([*matrix, 0.0, 0.0])[None], tf.float32)  # (1, 8)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=FILL_VALUE,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return tf.ensure_shape(out[0], image.shape)


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Counter-clockwise rotation by `degrees` about the image centre, as PIL's."""
    height, width = image.shape[0], image.shape[1]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    angle = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # input - centre = R(angle)^T (output - centre), rows pointing down
    return _affine(image, (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy))


def _to_uint8_levels(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(image * 255.0), tf.int32)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top floor(bits) bits of each 8-bit level."""
    shift = 8 - tf.cast(tf.floor(bits), tf.int32)
    levels = tf.bitwise.left_shift(tf.bitwise.right_shift(_to_uint8_levels(image), shift), shift)
    return tf.cast(levels, tf.float32) / 255.0


def _auto_contrast(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    """Stretches each channel's [min, max] to [0, 1]; flat channels are left alone."""
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    flat = high <= low
    scale = tf.where(flat, 1.0, 1.0 / tf.where(flat, 1.0, high - low))
    return tf.clip_by_value((image - tf.where(flat, 0.0, low)) * scale, 0.0, 1.0)


def _equalize(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation of each channel's 8-bit levels."""
    levels = _to_uint8_levels(image)  # (H, W, 3)
    offsets = tf.range(3) * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(levels + offsets, [-1]), minlength=768, maxlength=768), [3, 256])
    # PIL's step leaves out the brightest level's count, so that level maps to 255.
    top_count = tf.gather(hist, tf.reduce_max(levels, axis=[0, 1]), batch_dims=1)  # (3,)
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255  # (3,)
    safe_step = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((tf.cumsum(hist, axis=1, exclusive=True) + safe_step // 2) // safe_step, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # (3, 256); one level: unchanged
    out = tf.gather(tf.reshape(lut, [-1]), levels + offsets)
    return tf.cast(out, tf.float32) / 255.0


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH-filtered image (border pixels unfiltered, as PIL)."""
    kernel = tf.constant(_SMOOTH_KERNEL) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # (3, 3, 3, 1)
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    height, width = image.shape[0], image.shape[1]
    interior = tf.pad(tf.ones([height - 2, width - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
    return _blend(tf.where(interior, smooth, image), image, factor)


def _contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(tf.reduce_mean(to_grayscale(image)[..., 0]), image, factor)


def _shear_x(image: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    return _affine(image, (1.0, v, 0.0, 0.0, 1.0, 0.0))


def _shear_y(image: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    return _affine(image, (1.0, 0.0, 0.0, v, 1.0, 0.0))


def _translate_x(image: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    return _affine(image, (1.0, 0.0, v * image.shape[1], 0.0, 1.0, 0.0))


def _translate_y(image: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, v * image.shape[0]))


Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# name -> (op(image, value), lowest value, highest value). Enhancer factors: 0 gives the
# degenerate image (black / grey / mean / smoothed), 1 the image. Shear: x shift per row.
# Translate: fraction of the side. Solarize: levels >= threshold are inverted.
RANDAUGMENT_OPS: dict[str, tuple[Op, float, float]] = {
    "identity": (lambda x, _: x, 0.0, 1.0),
    "auto_contrast": (_auto_contrast, 0.0, 1.0),
    "equalize": (_equalize, 0.0, 1.0),
    "brightness": (lambda x, f: _blend(tf.zeros_like(x), x, f), 0.05, 0.95),
    "color": (lambda x, f: _blend(to_grayscale(x), x, f), 0.05, 0.95),
    "contrast": (_contrast, 0.05, 0.95),
    "sharpness": (_sharpness, 0.05, 0.95),
    "posterize": (_posterize, 4.0, 8.0),  # bits kept: floor(value), so 4-7
    "solarize": (lambda x, t: tf.where(x >= t, 1.0 - x, x), 0.0, 1.0),
    "rotate": (_rotate, -30.0, 30.0),  # degrees
    "shear_x": (_shear_x, -0.3, 0.3),
    "shear_y": (_shear_y, -0.3, 0.3),
    "translate_x": (_translate_x, -0.3, 0.3),
    "translate_y": (_translate_y, -0.3, 0.3),
}


def _check_seed(seed: tf.Tensor) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or seed.shape.rank != 1 or seed.shape[0] not in (2, None):
        raise ValueError(f"seed must be a shape-[2] integer tensor, got {seed.dtype.name} shape {seed.shape}")
    return seed


def _fold(seed: tf.Tensor, stream: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, stream)


@_no_autograph
def to_image_size(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """float32 (S, S, 3) in [0, 1]: images already (S, S) only converted, others centre-cropped."""
    image = ensure_rgb(image)
    shape = tf.shape(image)
    is_size = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(
        is_size, lambda: to_float(image), lambda: center_crop(image, image_size, crop_proportion=1.0)
    )
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return tf.clip_by_value(image, 0.0, 1.0)


def _flip_and_shift(
    image: tf.Tensor, seed: tf.Tensor, *, use_flip: bool, translate_fraction: float
) -> tf.Tensor:
    if not 0.0 <= translate_fraction < 0.5:
        raise ValueError(f"translate_fraction must be in [0, 0.5), got {translate_fraction}")
    if use_flip:
        image = tf.image.stateless_random_flip_left_right(image, _fold(seed, _WEAK_FLIP))
    pad = round(translate_fraction * image.shape[0])
    if pad > 0:
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        shape = image.shape
        image = tf.image.stateless_random_crop(padded, shape, _fold(seed, _WEAK_SHIFT))
        image = tf.ensure_shape(image, shape)
    return image


@_no_autograph
def weak_augment(
    image: tf.Tensor,
    *,
    image_size: int,
    seed: tf.Tensor,
    use_flip: bool = True,
    translate_fraction: float = 0.125,
) -> tf.Tensor:
    """FixMatch's weak view of one image (uint8 or float, (H, W, 1|3)): float32 (S, S, 3) in [0, 1].

    Flip with probability 1/2 if `use_flip` (off for digits and text), then a shift of
    up to round(translate_fraction * image_size) pixels along each axis.
    """
    seed = _check_seed(seed)
    image = to_image_size(image, image_size)
    return _flip_and_shift(image, seed, use_flip=use_flip, translate_fraction=translate_fraction)


@_no_autograph
def rand_augment(
    image: tf.Tensor, seed: tf.Tensor, *, num_ops: int = 2, ops: Sequence[str] = tuple(RANDAUGMENT_OPS)
) -> tf.Tensor:
    """`num_ops` ops drawn uniformly from `ops` (with replacement), each at a value uniform in its range."""
    unknown = sorted(set(ops) - set(RANDAUGMENT_OPS))
    if unknown or not ops:
        raise ValueError(f"RandAugment ops must be a non-empty subset of {sorted(RANDAUGMENT_OPS)}, got {list(ops)}")
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    table = [RANDAUGMENT_OPS[name] for name in ops]
    for i in range(num_ops):
        op_seed, value_seed = tf.unstack(tf.random.experimental.stateless_split(_fold(seed, i), 2))
        index = tf.random.stateless_uniform([], op_seed, maxval=len(table), dtype=tf.int32)
        u = tf.random.stateless_uniform([], value_seed)
        # Binding image and u now: switch_case branches take no arguments; only the chosen one runs.
        branches = [lambda fn=fn, lo=lo, hi=hi, x=image, u=u: fn(x, lo + (hi - lo) * u) for fn, lo, hi in table]
        image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
    return image


@_no_autograph
def cutout(image: tf.Tensor, seed: tf.Tensor, *, size: int) -> tf.Tensor:
    """Greys a `size` x `size` square centred at a uniform pixel, clipped at the image border."""
    if size <= 0:
        return image
    height, width = image.shape[0], image.shape[1]
    centre = tf.cast(tf.random.stateless_uniform([2], seed) * [height, width], tf.int32)  # (row, col)
    top, left = tf.unstack(centre - size // 2)
    rows = tf.range(height)
    cols = tf.range(width)
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    inside = in_rows[:, None, None] & in_cols[None, :, None]  # (H, W, 1)
    return tf.where(inside, tf.constant(FILL_VALUE, image.dtype), image)


@_no_autograph
def strong_augment(
    image: tf.Tensor,
    *,
    image_size: int,
    seed: tf.Tensor,
    use_flip: bool = True,
    translate_fraction: float = 0.125,
    num_ops: int = 2,
    ops: Sequence[str] = tuple(RANDAUGMENT_OPS),
    cutout_fraction: float = 0.5,
) -> tf.Tensor:
    """FixMatch's strong view: a weak draw, RandAugment, Cutout; float32 (S, S, 3) in [0, 1].

    The weak part uses a stream of `seed` independent of `weak_augment`'s, so the same
    seed may be passed to both. `cutout_fraction=0` turns Cutout off, `num_ops=0`
    RandAugment.
    """
    if not 0.0 <= cutout_fraction <= 1.0:
        raise ValueError(f"cutout_fraction must be in [0, 1], got {cutout_fraction}")
    seed = _check_seed(seed)
    image = weak_augment(
        image,
        image_size=image_size,
        seed=_fold(seed, _STRONG_WEAK),
        use_flip=use_flip,
        translate_fraction=translate_fraction,
    )
    image = rand_augment(image, _fold(seed, _RANDAUGMENT), num_ops=num_ops, ops=ops)
    return cutout(image, _fold(seed, _CUTOUT), size=round(cutout_fraction * image_size))
