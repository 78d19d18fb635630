"""SimCLR image augmentations: pure TensorFlow functions of one (H, W, C) image.

Every op works both eagerly and inside `tf.data.Dataset.map` (graph mode), and the
random ones draw from TensorFlow's stateful RNG, so they respect `tf.random.set_seed`.
Inputs are uint8 in [0, 255] or float32 in [0, 1]; every op that returns a new image
returns float32 in [0, 1] scale (bicubic resizing may overshoot slightly until the next
clip, exactly as in the original code).

Reference: Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised
Learners" (SimCLRv2), appendix A, and google-research/simclr `tf2/data_util.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

# Standard ImageNet evaluation crop: keep 87.5% of the shorter side.
CROP_PROPORTION = 0.875
# Grayscale weights of `tf.image.rgb_to_grayscale` (ITU-R 601).
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Longest blur kernel done as shifted sums rather than a convolution (measured on CPU).
_MAX_SHIFTED_SUM_TAPS = 15
# The original's random crop: 8-100% of the image area (the smallest can be changed with
# --crop_min_area), aspect ratio (width / height) 3/4-4/3.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float images pass through unchanged."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) * (1.0 / 255.0)
    return tf.cast(image, tf.float32)


def ensure_rgb(image: tf.Tensor) -> tf.Tensor:
    """Makes a 3-channel image from 1 (gray), 3 (RGB) or 4 (RGBA, alpha dropped) channels."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels == 4:
        return image[..., :3]
    if channels is not None:
        raise ValueError(f"Expected 1, 3 or 4 channels, got image shape {image.shape}")
    # Channel count only known at run time (rare: TFDS features without a static shape).
    dynamic = tf.shape(image)[-1]
    image = tf.cond(tf.equal(dynamic, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def random_apply(fn: Callable[[tf.Tensor], tf.Tensor], p: float, image: tf.Tensor) -> tf.Tensor:
    """Returns `fn(image)` with probability `p`, else `image`."""
    return tf.cond(tf.random.uniform([]) < p, lambda: fn(image), lambda: image)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bicubic resize to (size, size) as the original; float32 output in [0, 1] scale.

    Resizing the uint8 crop and rescaling afterwards is the same linear map as
    converting first, but converts only the output pixels.
    """
    resized = tf.image.resize(image, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    if image.dtype == tf.uint8:
        resized = resized * (1.0 / 255.0)
    return resized


# --------------------------------------------------------------------------- crops


def sample_crop_window(
    image_shape: tf.Tensor,
    *,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = CROP_ASPECT_RATIO_RANGE,
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> tf.Tensor:
    """Samples an Inception-style crop window for an image of shape `image_shape`.

    Returns int32 `[offset_y, offset_x, height, width]`. Area is a fraction of the
    image, aspect ratio is width / height. `min_object_covered` applies to a box
    covering the whole image (as the original), so in effect the area is at least
    max(area_range[0], min_object_covered). After `max_attempts` failures the whole
    image is returned.
    """
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])  # (1, 1, 4): [ymin, xmin, ymax, xmax]
    # The stateful op ignores `tf.random.set_seed` (its default seed=0 means "random");
    # its stateless twin seeded from the global RNG is the same sampler and follows it.
    seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.concat([begin[:2], size[:2]], axis=0)


def crop_and_resize(image: tf.Tensor, window: tf.Tensor, size: int) -> tf.Tensor:
    """Crops `window` = [offset_y, offset_x, height, width] and resizes to (size, size)."""
    window = tf.cast(window, tf.int32)
    # tf.slice instead of crop_to_bounding_box: the window is valid by construction,
    # so the latter's runtime assertions are wasted work in the per-image map.
    crop = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])
    crop.set_shape([None, None, image.shape[-1]])  # tf.slice forgets the channel count
    return _resize(crop, size)


def random_resized_crop(
    image: tf.Tensor, size: int, *, min_area: float = CROP_AREA_RANGE[0]
) -> tf.Tensor:
    """Random crop (area min_area-100%, aspect 3/4-4/3) resized to (size, size), bicubic."""
    window = sample_crop_window(tf.shape(image), area_range=(min_area, CROP_AREA_RANGE[1]))
    return crop_and_resize(image, window, size)


def center_crop(image: tf.Tensor, size: int, crop_proportion: float = CROP_PROPORTION) -> tf.Tensor:
    """Central square crop keeping `crop_proportion` of the shorter side, resized to (size, size).

    For a square output the original's aspect-ratio-preserving crop shape reduces to
    a square of side rint(crop_proportion * min(height, width)).
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(tf.math.rint(crop_proportion * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32)
    offset_y = (height - side + 1) // 2
    offset_x = (width - side + 1) // 2
    return crop_and_resize(image, tf.stack([offset_y, offset_x, side, side]), size)


# --------------------------------------------------------------------------- colour


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Multiplicative brightness change (the SimCLRv2 variant; v1 was additive)."""
    return image * factor


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma grayscale kept as 3 equal channels."""
    gray = tf.tensordot(image, tf.constant(_GRAY_WEIGHTS, image.dtype), axes=[[-1], [0]])
    return tf.repeat(gray[..., None], 3, axis=-1)


def _uniform(low: float, high: float) -> tf.Tensor:
    return tf.random.uniform([], low, high)


def color_jitter(image: tf.Tensor, strength: float, *, random_order: bool = True) -> tf.Tensor:
    """SimCLRv2 colour jitter of a float [0, 1] image.

    Brightness (multiplicative), contrast and saturation factors ~ U(1 - 0.8s, 1 + 0.8s),
    hue shift ~ U(-0.2s, 0.2s), applied in random order and clipped to [0, 1] after each.
    Lower bounds are clamped at 0 and the hue shift at 0.5 so strengths above 1.25 stay
    valid (the original raised for them). Ops of zero magnitude are skipped, so
    `strength=0` returns `image` unchanged.
    """
    b = c = s = 0.8 * strength
    h = min(0.2 * strength, 0.5)
    transforms: list[Callable[[tf.Tensor], tf.Tensor]] = []
    if b > 0:
        transforms.append(lambda x: adjust_brightness(x, _uniform(max(1.0 - b, 0.0), 1.0 + b)))
    if c > 0:
        transforms.append(lambda x: tf.image.adjust_contrast(x, _uniform(max(1.0 - c, 0.0), 1.0 + c)))
    if s > 0:
        transforms.append(lambda x: tf.image.adjust_saturation(x, _uniform(max(1.0 - s, 0.0), 1.0 + s)))
    if h > 0:
        transforms.append(lambda x: tf.image.adjust_hue(x, _uniform(-h, h)))
    if not transforms:
        return image

    if random_order:
        order = tf.random.shuffle(tf.range(len(transforms)))
    for i in range(len(transforms)):
        if random_order:
            # Bind the current image now; switch_case branches take no arguments.
            branches = [lambda t=t, x=image: t(x) for t in transforms]
            image = tf.switch_case(order[i], branches)
        else:
            image = transforms[i](image)
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def random_color_distortion(
    image: tf.Tensor, strength: float, *, jitter_p: float = 0.8, grayscale_p: float = 0.2
) -> tf.Tensor:
    """Colour jitter with probability `jitter_p`, then grayscale with probability `grayscale_p`."""
    image = random_apply(lambda x: color_jitter(x, strength), jitter_p, image)
    return random_apply(to_grayscale, grayscale_p, image)


# --------------------------------------------------------------------------- blur


def gaussian_kernel(kernel_size: int, sigma: tf.Tensor | float) -> tf.Tensor:
    """Normalised 1-D Gaussian of length 2 * (kernel_size // 2) + 1 (odd, as the original)."""
    radius = kernel_size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(image: tf.Tensor, kernel_size: int, sigma: tf.Tensor | float) -> tf.Tensor:
    """Separable Gaussian blur of an (H, W, C) float image, zero 'SAME' padding as the original.

    Both branches compute the same thing; per image, a weighted sum of shifted copies is
    ~5x cheaper than `depthwise_conv2d` for short kernels (images < 160 px), the
    convolution wins for long ones.
    """
    kernel = gaussian_kernel(kernel_size, sigma)  # (k,)
    k = kernel.shape[0]
    if k <= _MAX_SHIFTED_SUM_TAPS:
        return _blur_shifted_sum(image, kernel)
    channels = image.shape[-1] or tf.shape(image)[-1]
    kernel_h = tf.tile(tf.reshape(kernel, [1, k, 1, 1]), [1, 1, channels, 1])  # (1, k, C, 1)
    kernel_v = tf.reshape(kernel_h, [k, 1, channels, 1])  # (k, 1, C, 1)
    batch = image[None]  # depthwise_conv2d wants (1, H, W, C)
    batch = tf.nn.depthwise_conv2d(batch, kernel_h, strides=[1, 1, 1, 1], padding="SAME")
    batch = tf.nn.depthwise_conv2d(batch, kernel_v, strides=[1, 1, 1, 1], padding="SAME")
    return batch[0]


def _blur_shifted_sum(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """out[y] = sum_i kernel[i] * zero_padded[y + i], along height then width."""
    k = kernel.shape[0]
    radius = k // 2
    # Static sizes when known keep the output shape static for batching.
    height = image.shape[0] or tf.shape(image)[0]
    width = image.shape[1] or tf.shape(image)[1]
    padded = tf.pad(image, [[radius, radius], [0, 0], [0, 0]])
    image = tf.add_n([kernel[i] * padded[i : i + height] for i in range(k)])
    padded = tf.pad(image, [[0, 0], [radius, radius], [0, 0]])
    return tf.add_n([kernel[i] * padded[:, i : i + width] for i in range(k)])


def random_blur(
    image: tf.Tensor,
    kernel_size: int,
    *,
    p: float = 0.5,
    sigma_range: Sequence[float] = (0.1, 2.0),
) -> tf.Tensor:
    """Gaussian blur with probability `p`, sigma ~ U(sigma_range)."""
    if kernel_size // 2 == 0:  # a length-1 kernel is the identity (images under 20 px)
        return image

    def blur(x: tf.Tensor) -> tf.Tensor:
        return gaussian_blur(x, kernel_size, _uniform(sigma_range[0], sigma_range[1]))

    return random_apply(blur, p, image)


# --------------------------------------------------------------------------- affine


def affine_transform(
    image: tf.Tensor,
    *,
    rotation_degrees: tf.Tensor | float = 0.0,
    scale: tf.Tensor | float = 1.0,
    shift: tuple | tf.Tensor = (0.0, 0.0),
) -> tf.Tensor:
    """Rotates (counter-clockwise), scales and shifts (x, y pixels) a float (H, W, C) image about its centre.

    One bilinear resample for all three; pixels brought in from outside are 0 (black).
    """
    image = to_float(image)
    size = tf.cast(tf.shape(image)[:2], tf.float32)  # (H, W)
    centre_y, centre_x = (size[0] - 1) / 2, (size[1] - 1) / 2
    theta = tf.cast(rotation_degrees, tf.float32) * (math.pi / 180)
    scale = tf.cast(scale, tf.float32)
    shift = tf.cast(shift, tf.float32)
    # The op maps each output pixel to the input pixel it reads: the inverse of
    # "scale and rotate about the centre, then shift". Image y points down, so a
    # counter-clockwise rotation on screen has the sign flipped below.
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    dx, dy = centre_x + shift[0], centre_y + shift[1]
    transform = tf.stack([
        cos, -sin, centre_x - (cos * dx - sin * dy),
        sin, cos, centre_y - (sin * dx + cos * dy),
        0.0, 0.0,
    ])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT",
    )
    return out[0]


def random_affine(
    image: tf.Tensor, *, max_rotation_degrees: float, max_scale_change: float, max_shift: float
) -> tf.Tensor:
    """`affine_transform` with a rotation, scale and shift (a fraction of the side) drawn uniformly."""
    side = tf.cast(tf.shape(image)[:2], tf.float32)
    return affine_transform(
        image,
        rotation_degrees=_uniform(-max_rotation_degrees, max_rotation_degrees),
        scale=_uniform(1 - max_scale_change, 1 + max_scale_change),
        shift=tf.random.uniform([2], -max_shift, max_shift) * side[::-1],
    )


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Affine:
    """Ranges of `random_affine`: +-degrees, +-relative scale, +-shift as a fraction of the side."""

    rotation_degrees: float = 0.0
    scale_change: float = 0.0
    shift: float = 0.0

    @property
    def is_active(self) -> bool:
        return bool(self.rotation_degrees or self.scale_change or self.shift)


def preprocess_for_train(
    image: tf.Tensor,
    image_size: int,
    *,
    color_jitter_strength: float = 0.0,
    use_blur: bool = False,
    use_flip: bool = True,
    crop_min_area: float = CROP_AREA_RANGE[0],
    affine: Affine | None = None,
) -> tf.Tensor:
    """One random SimCLR view of `image` (uint8 or float, any size) as float32 (S, S, 3) in [0, 1].

    Random crop of `crop_min_area`-100% of the area, then a left-right flip with
    probability 1/2 if `use_flip` (both as the original by default; digits and text
    should not be mirrored); a random `affine` (not in the original: small rotations,
    zooms and shifts, which digits vary by); colour distortion if
    `color_jitter_strength > 0`; blur with kernel `image_size // 10` if `use_blur`
    (done batch-wise inside the model in the original, per image here).
    """
    image = random_resized_crop(image, image_size, min_area=crop_min_area)
    if use_flip:
        image = tf.image.random_flip_left_right(image)
    if affine is not None and affine.is_active:
        image = random_affine(
            image, max_rotation_degrees=affine.rotation_degrees, max_scale_change=affine.scale_change,
            max_shift=affine.shift,
        )
    if color_jitter_strength > 0:
        image = random_color_distortion(image, color_jitter_strength)
    image = tf.clip_by_value(image, 0.0, 1.0)
    if use_blur:
        image = random_blur(image, image_size // 10)
        # A [0, 1] image blurred by a kernel summing to 1 stays in range up to rounding.
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def preprocess_for_eval(
    image: tf.Tensor, image_size: int, *, crop_proportion: float = CROP_PROPORTION
) -> tf.Tensor:
    """Deterministic eval view as float32 (S, S, 3) in [0, 1].

    Centre crop of `crop_proportion` then resize; for `image_size <= 32` (CIFAR-like)
    no crop, as the original, just a resize (bicubic at the same size is the identity).
    """
    if image_size > 32:
        image = center_crop(image, image_size, crop_proportion)
    else:
        image = _resize(image, image_size)
    return tf.clip_by_value(image, 0.0, 1.0)
