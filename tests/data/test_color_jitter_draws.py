"""Colour jitter's own settings, read back from its outputs: each factor's range and kind.

Constant images make the four ops separable. On a constant image contrast does nothing
(every pixel is the mean); on a constant colour, brightness multiplies HSV's value,
saturation multiplies its saturation, hue shifts its hue, and none touches another's
quantity (no clipping at these levels). A grey image with two levels shows the contrast
factor alone as the change of (deviation / mean).
"""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import augment

STRENGTH = 0.5
DRAWS = 400
# SimCLRv2: brightness, contrast and saturation factors ~ U(1 - 0.8s, 1 + 0.8s), hue ~ U(-0.2s, 0.2s).
FACTOR_RANGE = (1 - 0.8 * STRENGTH, 1 + 0.8 * STRENGTH)
HUE_RANGE = (-0.2 * STRENGTH, 0.2 * STRENGTH)


def _jitter_many(image: np.ndarray) -> np.ndarray:
    """DRAWS independent jitters of `image`, in a graph as the input pipeline runs them."""
    tf.random.set_seed(1)
    image = tf.constant(image)
    run = tf.function(lambda: tf.map_fn(lambda _: augment.color_jitter(image, STRENGTH), tf.range(DRAWS),
                                        fn_output_signature=tf.float32))
    return run().numpy()


def _assert_fills(values: np.ndarray, low: float, high: float, what: str) -> None:
    """All within [low, high], and reaching both ends (400 uniform draws: within 4% of the width)."""
    margin = 0.04 * (high - low)
    assert values.min() >= low - 1e-4 and values.max() <= high + 1e-4, (what, values.min(), values.max())
    assert values.min() < low + margin and values.max() > high - margin, (what, values.min(), values.max())


@pytest.fixture(scope="module")
def constant_colour():
    colour = np.array([0.5, 0.3, 0.25], "float32")  # HSV (0.0333, 0.5, 0.5)
    image = np.broadcast_to(colour, (2, 2, 3)).copy()
    out = _jitter_many(image)
    assert np.ptp(out, axis=(1, 2)).max() < 1e-6  # still one colour
    return tf.image.rgb_to_hsv(colour).numpy(), tf.image.rgb_to_hsv(out[:, 0, 0]).numpy()


def test_brightness_is_a_factor_in_its_range(constant_colour):
    before, after = constant_colour
    # Additive brightness (SimCLRv1) would move the value by a delta instead: its ratio
    # would depend on the level and leave this range.
    _assert_fills(after[:, 2] / before[2], *FACTOR_RANGE, "brightness (value ratio)")


def test_saturation_factor_range(constant_colour):
    before, after = constant_colour
    _assert_fills(after[:, 1] / before[1], *FACTOR_RANGE, "saturation (saturation ratio)")


def test_hue_shift_range(constant_colour):
    before, after = constant_colour
    shift = (after[:, 0] - before[0] + 0.5) % 1.0 - 0.5
    _assert_fills(shift, *HUE_RANGE, "hue shift")


def test_contrast_factor_range_and_brightness_on_grey():
    image = np.full((2, 2, 3), 0.3, "float32")
    image[0] = 0.5  # mean 0.4, deviation +-0.1
    out = _jitter_many(image)
    assert np.ptp(out, axis=-1).max() < 1e-6  # still grey
    mean = out.mean(axis=(1, 2, 3))
    deviation = out[:, 0, 0, 0] - mean
    # Brightness scales mean and deviation alike; contrast only the deviation.
    _assert_fills((deviation / mean) / (0.1 / 0.4), *FACTOR_RANGE, "contrast")
    _assert_fills(mean / 0.4, *FACTOR_RANGE, "brightness (grey mean ratio)")
