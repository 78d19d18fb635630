"""Image ops: eager vs tf.data equality, NumPy references, ranges and crop statistics."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import augment


def _rng_image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def _in_tf_data(fn, image):
    """Runs fn inside a tf.data map (graph mode), as the input pipeline does."""
    ds = tf.data.Dataset.from_tensors(image).map(fn)
    return next(iter(ds)).numpy()


def _numpy_kernel(kernel_size, sigma):
    radius = kernel_size // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _numpy_blur(image, kernel):
    """Separable correlation with zero padding ('SAME'), in float64."""
    r = len(kernel) // 2
    h, w, _ = image.shape
    padded = np.pad(image.astype(np.float64), [(r, r), (0, 0), (0, 0)])
    rows = sum(kernel[i] * padded[i : i + h] for i in range(len(kernel)))
    padded = np.pad(rows, [(0, 0), (r, r), (0, 0)])
    return sum(kernel[i] * padded[:, i : i + w] for i in range(len(kernel)))


DETERMINISTIC_OPS = {
    "center_crop": (lambda x: augment.center_crop(x, 48), (60, 90, 3), np.uint8),
    "crop_and_resize": (
        lambda x: augment.crop_and_resize(x, tf.constant([3, 5, 20, 30]), 24), (40, 50, 3), np.uint8
    ),
    "blur_short_kernel": (lambda x: augment.gaussian_blur(x, 3, 0.7), (32, 32, 3), np.float32),
    "blur_long_kernel": (lambda x: augment.gaussian_blur(x, 22, 1.7), (40, 36, 3), np.float32),
    "grayscale": (augment.to_grayscale, (17, 23, 3), np.float32),
    "saturation": (lambda x: tf.image.adjust_saturation(x, 1.6), (16, 16, 3), np.float32),
    "hue": (lambda x: tf.image.adjust_hue(x, -0.15), (16, 16, 3), np.float32),
    "contrast": (lambda x: tf.image.adjust_contrast(x, 0.4), (16, 16, 3), np.float32),
    "eval_crop": (lambda x: augment.preprocess_for_eval(x, 64), (80, 70, 3), np.uint8),
    "eval_small": (lambda x: augment.preprocess_for_eval(x, 32), (28, 28, 3), np.uint8),
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_OPS))
def test_deterministic_op_same_eager_and_in_tf_data(name):
    fn, shape, dtype = DETERMINISTIC_OPS[name]
    image = _rng_image(shape, dtype)
    eager = fn(tf.constant(image)).numpy()
    graph = _in_tf_data(fn, image)
    assert eager.dtype == np.float32
    np.testing.assert_array_equal(graph, eager)
    assert np.isfinite(eager).all()


@pytest.mark.parametrize(
    "kernel_size, sigma, taps", [(3, 0.5, 3), (4, 1.0, 5), (22, 2.0, 23), (6, 0.1, 7)]
)
def test_gaussian_kernel_matches_numpy_and_sums_to_one(kernel_size, sigma, taps):
    kernel = augment.gaussian_kernel(kernel_size, tf.constant(sigma)).numpy()
    assert kernel.shape == (taps,)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(kernel, _numpy_kernel(kernel_size, sigma), atol=1e-6)


@pytest.mark.parametrize("kernel_size, shape", [(3, (32, 32, 3)), (6, (20, 24, 3)), (22, (40, 36, 3))])
def test_gaussian_blur_matches_numpy(kernel_size, shape):
    image = _rng_image(shape, np.float32, seed=kernel_size)
    sigma = 1.3
    got = augment.gaussian_blur(tf.constant(image), kernel_size, sigma).numpy()
    want = _numpy_blur(image, _numpy_kernel(kernel_size, sigma))
    assert got.shape == shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_keeps_static_shape_in_graph():
    spec = tf.TensorSpec([32, 32, 3], tf.float32)
    for k in (3, 22):
        out = tf.function(lambda x, k=k: augment.gaussian_blur(x, k, 1.0)).get_concrete_function(spec)
        assert out.output_shapes == tf.TensorShape([32, 32, 3])


@pytest.mark.parametrize("use_blur", [False, True])
def test_preprocess_output_shapes_are_static_in_graph(use_blur):
    spec = tf.TensorSpec([None, None, 3], tf.uint8)
    train = tf.function(
        lambda x: augment.preprocess_for_train(x, 40, color_jitter_strength=1.0, use_blur=use_blur)
    ).get_concrete_function(spec)
    assert train.output_shapes == tf.TensorShape([40, 40, 3])
    for size in (32, 64):
        evaluation = tf.function(lambda x, s=size: augment.preprocess_for_eval(x, s)).get_concrete_function(spec)
        assert evaluation.output_shapes == tf.TensorShape([size, size, 3])


def test_color_jitter_strength_zero_is_identity():
    image = tf.constant(_rng_image((20, 20, 3), np.float32))
    np.testing.assert_array_equal(augment.color_jitter(image, 0.0).numpy(), image.numpy())
    np.testing.assert_array_equal(_in_tf_data(lambda x: augment.color_jitter(x, 0.0), image), image.numpy())


def test_color_jitter_changes_colours_and_stays_in_range():
    tf.random.set_seed(1)
    image = tf.constant(_rng_image((20, 20, 3), np.float32))
    outs = [augment.color_jitter(image, 1.0).numpy() for _ in range(8)]
    assert all(o.min() >= 0.0 and o.max() <= 1.0 for o in outs)
    assert all(not np.allclose(o, image.numpy(), atol=1e-3) for o in outs)
    # Random factors: two draws differ.
    assert not np.allclose(outs[0], outs[1])


def test_grayscale_has_equal_channels_with_luma_weights():
    image = _rng_image((9, 11, 3), np.float32)
    gray = augment.to_grayscale(tf.constant(image)).numpy()
    assert gray.shape == image.shape
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_allclose(gray[..., 0], image @ np.array([0.2989, 0.5870, 0.1140]), atol=1e-6)


def test_brightness_is_multiplicative():
    image = _rng_image((5, 5, 3), np.float32) * 0.5
    np.testing.assert_allclose(augment.adjust_brightness(tf.constant(image), 1.5).numpy(), image * 1.5, rtol=1e-6)


def test_sampled_crop_windows_respect_area_and_aspect_ranges():
    height, width = 200, 300
    n = 3000
    tf.random.set_seed(0)
    windows = (
        tf.data.Dataset.range(n)
        .map(lambda _: augment.sample_crop_window(tf.constant([height, width, 3])))
        .batch(n)
        .get_single_element()
        .numpy()
    )
    oy, ox, h, w = windows.T
    assert (oy >= 0).all() and (ox >= 0).all()
    assert (oy + h <= height).all() and (ox + w <= width).all()
    area = h * w / (height * width)
    aspect = w / h
    assert area.min() >= 0.08 and area.max() <= 1.0
    # Integer rounding of the sides moves the aspect ratio by at most ~1/h.
    assert aspect.min() >= 3 / 4 - 1 / h.min() and aspect.max() <= 4 / 3 + 1 / h.min()
    # The samples spread over the ranges (min_object_covered=0.1 lifts the area floor).
    assert area.min() < 0.15 and area.max() > 0.8 and 0.3 < np.median(area) < 0.7
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    # Offsets are random too, not always the corner or the centre.
    assert len(np.unique(oy)) > 50 and len(np.unique(ox)) > 50


def test_random_views_follow_tf_random_set_seed():
    image = tf.constant(_rng_image((40, 30, 3)))

    def draws():
        tf.random.set_seed(7)
        return [
            augment.preprocess_for_train(image, 24, color_jitter_strength=1.0, use_blur=True).numpy()
            for _ in range(4)
        ]

    first, second = draws(), draws()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])  # still a new draw per call


def test_crop_and_resize_reads_the_requested_window():
    # Left half black, right half white: a window inside the right half is all white.
    probe = np.zeros([40, 40, 3], np.uint8)
    probe[:, 20:] = 255
    out = augment.crop_and_resize(tf.constant(probe), tf.constant([5, 22, 30, 15]), 16).numpy()
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    out = augment.crop_and_resize(tf.constant(probe), tf.constant([0, 0, 40, 18]), 16).numpy()
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_center_crop_geometry_matches_original_formula():
    # H=100, W=60: side = rint(0.875 * 60) = 52; offsets ((100-52+1)//2, (60-52+1)//2) = (24, 4).
    image = _rng_image((100, 60, 3))
    got = augment.center_crop(tf.constant(image), 52).numpy()
    np.testing.assert_allclose(got, image[24:76, 4:56] / 255.0, atol=1e-6)


def test_eval_small_images_are_not_cropped():
    image = _rng_image((32, 32, 3))
    out = augment.preprocess_for_eval(tf.constant(image), 32).numpy()
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)
    assert augment.preprocess_for_eval(tf.constant(image), 24).shape == (24, 24, 3)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_ensure_rgb(channels):
    image = _rng_image((6, 7, channels))
    rgb = augment.ensure_rgb(tf.constant(image)).numpy()
    assert rgb.shape == (6, 7, 3)
    np.testing.assert_array_equal(rgb[..., 0], image[..., 0])
    if channels == 1:
        np.testing.assert_array_equal(rgb[..., 2], image[..., 0])


RANDOM_CASES = {
    "pretrain_uint8": (dict(color_jitter_strength=1.0, use_blur=True), (50, 37, 3), np.uint8, 32),
    "pretrain_float_big": (dict(color_jitter_strength=0.5, use_blur=True), (90, 120, 3), np.float32, 64),
    "strong_jitter": (dict(color_jitter_strength=2.0, use_blur=False), (28, 28, 3), np.uint8, 28),
    "crop_flip_only": (dict(color_jitter_strength=0.0, use_blur=False), (32, 32, 3), np.uint8, 32),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CASES))
def test_preprocess_for_train_shape_range_finite(name):
    kwargs, shape, dtype, size = RANDOM_CASES[name]
    image = _rng_image(shape, dtype)
    fn = lambda x: augment.preprocess_for_train(x, size, **kwargs)  # noqa: E731
    eager = [fn(tf.constant(image)).numpy() for _ in range(4)]
    graph = next(iter(tf.data.Dataset.from_tensors(image).repeat(4).map(fn).batch(4))).numpy()
    for out in eager + list(graph):
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        assert np.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
    # Views are random: not all draws are equal.
    assert not all(np.array_equal(graph[0], g) for g in graph[1:])


def test_random_ops_in_range_and_random():
    image = tf.constant(_rng_image((32, 32, 3), np.float32))
    blurred = [augment.random_blur(image, 3, p=1.0).numpy() for _ in range(3)]
    assert all(np.isfinite(b).all() and b.min() >= 0 and b.max() <= 1 for b in blurred)
    assert not np.allclose(blurred[0], blurred[1])  # sigma is random
    np.testing.assert_array_equal(augment.random_blur(image, 3, p=0.0).numpy(), image.numpy())
    # Grayscale is applied with p=0.2: over many draws some outputs are gray, most not.
    tf.random.set_seed(3)
    outs = [augment.random_color_distortion(image, 1.0).numpy() for _ in range(60)]
    gray = [np.allclose(o[..., 0], o[..., 1]) and np.allclose(o[..., 1], o[..., 2]) for o in outs]
    assert 2 <= sum(gray) <= 25
