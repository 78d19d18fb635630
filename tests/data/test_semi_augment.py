"""Weak/strong semi-supervised augmentations: pure functions of (image, seed), geometry, ops vs PIL."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from simclr_tf.data import semi_augment

S = 32
GREY = 0.5  # Cutout's fill, and what geometric ops bring in (FixMatch's)
FUNCTIONS = {"weak": semi_augment.weak_augment, "strong": semi_augment.strong_augment}


def _seed(i: int) -> tf.Tensor:
    return tf.constant([7, i], tf.int64)


def _rng_image(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def _eager(fn, image, seeds, **kwargs) -> np.ndarray:
    return np.stack([fn(tf.constant(image), image_size=S, seed=_seed(i), **kwargs).numpy() for i in seeds])


def _tf_data(fn, image, seeds, **kwargs) -> tf.data.Dataset:
    """Same draws inside a parallel tf.data map (graph mode), as the input pipeline runs them."""
    image = tf.constant(image)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(seeds, np.int64)).map(
        lambda i: fn(image, image_size=S, seed=tf.stack([tf.constant(7, tf.int64), i]), **kwargs),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.batch(len(seeds))


def _in_tf_data(fn, image, seeds, **kwargs) -> np.ndarray:
    return _tf_data(fn, image, seeds, **kwargs).get_single_element().numpy()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_pure_function_of_image_and_seed_eager_and_in_tf_data(name):
    fn = FUNCTIONS[name]
    image = _rng_image((40, 36, 3))
    seeds = list(range(6))
    ds = _tf_data(fn, image, seeds)  # built once: tracing the strong graph takes ~1 s
    in_tf_data = ds.get_single_element().numpy()
    np.testing.assert_array_equal(in_tf_data, ds.get_single_element().numpy())  # a second run
    np.testing.assert_array_equal(in_tf_data, _eager(fn, image, seeds))
    eager = in_tf_data
    # Different seeds give different views (weak has 2 * 9 * 9 outcomes, so allow a collision).
    distinct = len({view.tobytes() for view in eager})
    assert distinct >= (len(seeds) - 1 if name == "weak" else len(seeds))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((32, 32, 3), np.uint8),
        ((32, 32, 3), np.float32),
        ((32, 32, 1), np.uint8),
        ((50, 70, 3), np.uint8),  # larger than S
        ((20, 24, 1), np.float32),  # smaller than S
    ],
)
def test_output_shape_dtype_range(name, shape, dtype):
    views = _eager(FUNCTIONS[name], _rng_image(shape, dtype), range(4))
    assert views.shape == (4, S, S, 3) and views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0
    if shape[-1] == 1:  # gray in, gray out: all ops keep the three channels equal
        np.testing.assert_allclose(views[..., 0], views[..., 2], atol=1e-6)


def test_same_size_image_is_only_converted():
    image = _rng_image((S, S, 3))
    view = semi_augment.weak_augment(image, image_size=S, seed=_seed(0), use_flip=False, translate_fraction=0.0)
    np.testing.assert_allclose(view.numpy(), image / 255.0, atol=1e-6)


def test_other_sizes_take_the_centre_square_of_the_whole_shorter_side():
    image = _rng_image((48, 80, 3))
    view = semi_augment.weak_augment(image, image_size=S, seed=_seed(0), use_flip=False, translate_fraction=0.0)
    square = tf.constant(image[:, 16:64] / 255.0, tf.float32)
    expected = tf.clip_by_value(tf.image.resize(square, [S, S], method="bicubic"), 0.0, 1.0)
    np.testing.assert_allclose(view.numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("translate_fraction", [0.125, 0.25])
def test_weak_shift_is_at_most_translate_fraction(translate_fraction):
    image = np.zeros((S, S, 3), np.uint8)
    image[S // 2, S // 2] = 255
    views = _in_tf_data(
        semi_augment.weak_augment, image, range(300), use_flip=False, translate_fraction=translate_fraction
    )
    bright = np.argwhere(views[..., 0] > 0.5)  # (view, row, col)
    np.testing.assert_array_equal(bright[:, 0], np.arange(300))  # exactly one bright pixel per view
    offsets = bright[:, 1:] - S // 2
    limit = round(translate_fraction * S)
    assert np.abs(offsets).max() == limit  # never further, and the full range is reached
    assert (offsets.min(0) == -limit).all() and (offsets.max(0) == limit).all()


def test_weak_flip_off_never_mirrors_and_on_mirrors_about_half():
    image = _rng_image((S, S, 3))
    expected = image / 255.0
    off = _in_tf_data(semi_augment.weak_augment, image, range(100), use_flip=False, translate_fraction=0.0)
    np.testing.assert_allclose(off, np.broadcast_to(expected, off.shape), atol=1e-6)
    on = _in_tf_data(semi_augment.weak_augment, image, range(100), use_flip=True, translate_fraction=0.0)
    mirrored = np.array([np.allclose(v, expected[:, ::-1], atol=1e-6) for v in on])
    unchanged = np.array([np.allclose(v, expected, atol=1e-6) for v in on])
    assert (mirrored ^ unchanged).all() and 30 <= mirrored.sum() <= 70


@pytest.mark.parametrize("cutout_fraction", [0.5, 0.25])
def test_cutout_greys_a_square_of_the_stated_size(cutout_fraction):
    image = np.full((S, S, 3), np.float32(0.9))
    views = _in_tf_data(
        semi_augment.strong_augment, image, range(60), num_ops=0, translate_fraction=0.0,
        cutout_fraction=cutout_fraction,
    )
    side = round(cutout_fraction * S)
    full = 0
    for view in views:
        grey = np.all(view == GREY, axis=-1)
        assert np.all((view == np.float32(0.9)) | grey[..., None])  # nothing else changed
        rows, cols = np.nonzero(grey.any(1))[0], np.nonzero(grey.any(0))[0]
        assert grey.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        assert np.ptp(rows) + 1 <= side and np.ptp(cols) + 1 <= side
        if rows.min() > 0 and cols.min() > 0 and rows.max() < S - 1 and cols.max() < S - 1:
            assert len(rows) == len(cols) == side  # away from the border: the whole square
            full += 1
    assert full >= 5


OP_NAMES = sorted(semi_augment.RANDAUGMENT_OPS)


@pytest.mark.parametrize("fraction", [0.25, 0.6])
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_randaugment_op_changes_the_image_and_stays_in_range(name, fraction):
    # Levels in [0.2, 0.7], so that auto-contrast, equalize and solarize have work to do.
    image = (np.round(_rng_image((S, S, 3), np.float32) * 127) + 51) / 255.0
    fn, low, high = semi_augment.RANDAUGMENT_OPS[name]
    out = fn(tf.constant(image, tf.float32), tf.constant(low + fraction * (high - low))).numpy()
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed = np.abs(out - image).max() > 1e-3
    assert changed == (name != "identity")


@pytest.mark.parametrize("num_ops", [1, 2])
def test_randaugment_draws_ops_uniformly_and_values_across_the_range(num_ops):
    """On a white image brightness(f) gives f: the outputs show each op's choice and value."""
    white = tf.ones([S, S, 3])
    out = (
        tf.data.Dataset.range(400)
        .map(lambda i: semi_augment.rand_augment(white, tf.stack([3, i]), num_ops=num_ops, ops=("identity", "brightness")))
        .batch(400)
        .get_single_element()
        .numpy()
    )
    level = out[:, 0, 0, 0]
    assert np.all(out == level[:, None, None, None])
    unchanged = np.mean(level == 1.0)
    assert abs(unchanged - 0.5**num_ops) < 0.07  # identity drawn num_ops times
    once = level[level < 1.0] if num_ops == 1 else level[(level < 1.0) & (level >= 0.05)]
    assert once.min() >= 0.05 - 1e-6 and once.max() <= 0.95 + 1e-6
    assert once.min() < 0.15 and once.max() > 0.85  # values spread over the range
    if num_ops == 2:
        assert (level < 0.05).any()  # two brightness draws compose (0.05-0.95 squared)


# name, value, bright pixel in, where it lands (row, col); 33 x 33 image, centre (16, 16)
GEOMETRY = [
    ("rotate", 90.0, (6, 16), (16, 6)),  # counter-clockwise: above the centre -> left of it
    ("rotate", -30.0, (6, 16), (7, 21)),  # 10 px from the centre, 30 degrees clockwise
    ("shear_x", 0.25, (16, 20), (16, 16)),  # row y takes column x + 0.25 y
    ("shear_y", 0.25, (20, 16), (16, 16)),  # column x takes row y + 0.25 x
]


@pytest.mark.parametrize("name,value,source,target", GEOMETRY)
def test_geometric_op_moves_a_pixel_where_its_value_says(name, value, source, target):
    image = np.zeros((33, 33, 3), np.float32)
    image[source] = 1.0
    out = semi_augment.RANDAUGMENT_OPS[name][0](tf.constant(image), tf.constant(value)).numpy()
    bright = np.argwhere(out[..., 0] == 1.0)
    assert [tuple(p) for p in bright] == [target]
    if value != 90.0:  # a quarter turn of a square covers it all
        assert (out[..., 0] == GREY).any()  # what the op uncovers is grey


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


# name -> (value in the op's units, the same transform done by PIL on uint8 pixels)
PIL_REFERENCES = {
    "auto_contrast": (0.0, ImageOps.autocontrast),
    "equalize": (0.0, ImageOps.equalize),
    "posterize": (5.7, lambda im: ImageOps.posterize(im, 5)),
    "solarize": (0.41, lambda im: ImageOps.solarize(im, 105)),  # levels >= 0.41 * 255 = 104.6
    "brightness": (0.3, lambda im: ImageEnhance.Brightness(im).enhance(0.3)),
    "color": (0.3, lambda im: ImageEnhance.Color(im).enhance(0.3)),
    "contrast": (0.3, lambda im: ImageEnhance.Contrast(im).enhance(0.3)),
    "sharpness": (0.3, lambda im: ImageEnhance.Sharpness(im).enhance(0.3)),
    "translate_x": (-0.25, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, -8, 0, 1, 0))),
    "translate_y": (0.125, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, 4))),
}


@pytest.mark.parametrize("name", sorted(PIL_REFERENCES))
def test_op_matches_pil(name):
    """The ops follow PIL's definitions, which FixMatch's and USB's RandAugment use."""
    image = _rng_image((S, S, 3), seed=3)
    image[:, :, 1] = image[:, :, 1] // 2 + 40  # a channel not spanning 0-255, for auto-contrast
    value, reference = PIL_REFERENCES[name]
    fn = semi_augment.RANDAUGMENT_OPS[name][0]
    out = fn(tf.constant(image / 255.0, tf.float32), tf.constant(value, tf.float32)).numpy()
    expected = np.asarray(reference(_pil(image)), np.float32) / 255.0
    if name.startswith("translate"):  # PIL fills black where ours fills grey
        uncovered = np.all(expected == 0, axis=-1) & np.all(out == GREY, axis=-1)
        expected[uncovered] = GREY
    # PIL rounds to uint8 (and computes grey levels in integers): within 2 levels.
    np.testing.assert_allclose(out, expected, atol=2.5 / 255)


def test_bad_arguments_name_the_argument():
    image = _rng_image((S, S, 3))
    with pytest.raises(ValueError, match="seed"):
        semi_augment.weak_augment(image, image_size=S, seed=tf.constant([1, 2, 3]))
    with pytest.raises(ValueError, match="translate_fraction"):
        semi_augment.weak_augment(image, image_size=S, seed=_seed(0), translate_fraction=0.5)
    with pytest.raises(ValueError, match="ops"):
        semi_augment.strong_augment(image, image_size=S, seed=_seed(0), ops=("rotate", "zoom"))
    with pytest.raises(ValueError, match="cutout_fraction"):
        semi_augment.strong_augment(image, image_size=S, seed=_seed(0), cutout_fraction=1.5)
