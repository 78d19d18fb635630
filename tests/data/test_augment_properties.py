"""Property tests of the augmentations over image sizes, dtypes, contents and strengths."""

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import tensorflow as tf

from simclr_tf.data import augment

# Eager TF ops cost milliseconds each: few examples, no per-example deadline.
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


@st.composite
def images(draw, channels=st.just(3)):
    """uint8 [0, 255] or float32 [0, 1] images of any size from 1 to 80, with extreme contents too."""
    height = draw(st.integers(1, 80))
    width = draw(st.integers(1, 80))
    depth = draw(channels)
    dtype = draw(st.sampled_from([np.uint8, np.float32]))
    kind = draw(st.sampled_from(["noise", "black", "white", "two_tone"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    unit = {
        "noise": rng.random((height, width, depth)),
        "black": np.zeros((height, width, depth)),
        "white": np.ones((height, width, depth)),
        "two_tone": (rng.random((height, width, 1)) > 0.5) * np.ones((1, 1, depth)),
    }[kind]
    return (unit * 255).round().astype(np.uint8) if dtype == np.uint8 else unit.astype(np.float32)


def _check(out, size):
    out = out.numpy()
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@SETTINGS
@given(
    image=images(),
    size=st.integers(8, 64),
    strength=st.one_of(st.just(0.0), st.floats(0.0, 3.0)),
    use_blur=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_views_keep_shape_and_range_without_nan(image, size, strength, use_blur, seed):
    tf.random.set_seed(seed)
    out = augment.preprocess_for_train(
        tf.constant(image), size, color_jitter_strength=strength, use_blur=use_blur
    )
    _check(out, size)


@SETTINGS
@given(image=images(), size=st.integers(8, 256))
def test_eval_views_keep_shape_and_range_without_nan(image, size):
    _check(augment.preprocess_for_eval(tf.constant(image), size), size)


@SETTINGS
@given(image=images(), strength=st.floats(0.0, 5.0), seed=st.integers(0, 2**31 - 1))
def test_colour_distortion_of_float_images_stays_in_range(image, strength, seed):
    tf.random.set_seed(seed)
    image = augment.to_float(tf.constant(image))
    out = augment.random_color_distortion(image, strength).numpy()
    assert out.shape == image.shape and np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@SETTINGS
@given(image=images(channels=st.sampled_from([1, 3, 4])))
def test_ensure_rgb_keeps_the_pixels(image):
    rgb = augment.ensure_rgb(tf.constant(image)).numpy()
    assert rgb.shape == (*image.shape[:2], 3) and rgb.dtype == image.dtype
    np.testing.assert_array_equal(rgb[..., 0], image[..., 0])
