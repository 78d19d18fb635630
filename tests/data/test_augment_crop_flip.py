"""--crop_min_area, --use_flip and --affine_*: measured on views of images whose content is known."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.data import augment, build_dataset
from simclr_tf.train import experiment as experiment_lib

SIDE = 64  # source image side
SIZE = 32  # view side
DRAWS = 200


def _coordinate_image() -> np.ndarray:
    """Float image whose channel 0 is the row / (SIDE - 1), channel 1 the column / (SIDE - 1)."""
    rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, SIDE // 2)], -1).astype(np.float32) / (SIDE - 1)


def _area_and_direction(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) views -> the crop's area fraction (within ~0.01) and +1/-1 if (not) mirrored.

    A view's first and last output columns sample the window's edge pixels' centres,
    so the coordinate span between them is (side - side / SIZE) source pixels.
    """
    span_y = (views[:, -1, :, 0].mean(1) - views[:, 0, :, 0].mean(1)) * (SIDE - 1)
    span_x = (views[:, :, -1, 1].mean(1) - views[:, :, 0, 1].mean(1)) * (SIDE - 1)
    area = span_y * np.abs(span_x) / SIDE**2 * (SIZE / (SIZE - 1)) ** 2
    return area, np.sign(span_x)


def _views(**kwargs) -> np.ndarray:
    tf.random.set_seed(0)
    image = tf.constant(_coordinate_image())
    return (
        tf.data.Dataset.range(DRAWS)
        .map(lambda _: augment.preprocess_for_train(image, SIZE, **kwargs))
        .batch(DRAWS)
        .get_single_element()
        .numpy()
    )


@pytest.mark.parametrize("crop_min_area", [0.3, 0.6])
def test_crop_min_area_bounds_the_crop_area(crop_min_area):
    area, _ = _area_and_direction(_views(crop_min_area=crop_min_area))
    assert area.min() >= crop_min_area - 0.01 and area.max() <= 1.01
    # Still random, and reaching down to near the floor.
    assert area.min() < crop_min_area + 0.1 and area.max() - area.min() > 0.2


def test_default_crop_area_is_the_originals():
    area, _ = _area_and_direction(_views())
    # The original's floor is 8% of the area, lifted to 10% by min_object_covered.
    assert area.min() >= 0.1 - 0.01 and area.min() < 0.2


def test_flip_off_never_mirrors_and_on_mirrors_about_half():
    _, direction = _area_and_direction(_views(use_flip=False))
    assert (direction > 0).all()
    _, direction = _area_and_direction(_views())  # default: flips, as the original
    assert 0.3 < np.mean(direction < 0) < 0.7


class _CoordinateSource:
    """A Source of one coordinate image, for the pipeline."""

    name = "coordinates"
    num_classes = 1
    class_names = ["image"]

    def num_examples(self, split, labeled_subset=None):
        return 8

    def as_dataset(self, split, *, shuffle_files, input_context=None, seed=None, labeled_subset=None):
        image = (_coordinate_image() * 255).round().astype(np.uint8)
        return tf.data.Dataset.from_tensors((image, np.int64(0))).repeat(8)


def test_build_dataset_passes_crop_and_flip_settings_to_every_view():
    ds = build_dataset(
        _CoordinateSource(), split="train", batch_size=8, is_training=True, num_views=2,
        image_size=SIZE, color_jitter_strength=0.0, use_blur=False, use_flip=False, crop_min_area=0.6,
    )
    views = np.concatenate([batch["image"].numpy() for batch in ds.take(6)])  # (96, S, S, 3)
    area, direction = _area_and_direction(views)
    assert (direction > 0).all()
    assert area.min() >= 0.6 - 0.015  # uint8 rounding of the coordinates adds a little


@pytest.mark.parametrize("train_mode", ["pretrain", "supervised"])
def test_experiment_hands_the_flags_to_the_training_pipeline(monkeypatch, tmp_path, train_mode):
    seen = {}

    def fake_build_dataset(source, **kwargs):
        seen.update(kwargs)
        return tf.data.Dataset.range(1)

    monkeypatch.setattr(experiment_lib.data_lib, "build_dataset", fake_build_dataset)
    config = config_lib.Config.demo().replace(
        data={"train_split": "train[:16]", "eval_split": "validation[:16]", "use_flip": False, "crop_min_area": 0.4},
        train={"train_mode": train_mode, "train_batch_size": 8},
    )
    experiment = experiment_lib.Experiment.create(config, str(tmp_path))
    experiment.replica_train_dataset(8)
    assert seen["use_flip"] is False and seen["crop_min_area"] == 0.4
    assert seen["affine"] == augment.Affine(rotation_degrees=15.0, scale_change=0.1, shift=0.1)  # the demo's

    seen.clear()
    config = config.replace(data={"affine_rotation_degrees": 10.0, "affine_scale_change": 0.0, "affine_shift": 0.0})
    experiment_lib.Experiment.create(config, str(tmp_path)).replica_train_dataset(8)
    assert seen["affine"] == augment.Affine(rotation_degrees=10.0, scale_change=0.0, shift=0.0)
    # Every non-demo run has the original's views: no affine.
    original = config_lib.Config().data
    assert not augment.Affine(original.affine_rotation_degrees, original.affine_scale_change, original.affine_shift).is_active


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_bad_crop_min_area_names_the_flag(value):
    config = config_lib.Config().replace(data={"crop_min_area": value})
    with pytest.raises(config_lib.FlagError, match="--crop_min_area"):
        config_lib.validate(config)


# --------------------------------------------------------------------------- affine


def test_affine_quarter_turn_and_whole_pixel_shift_match_numpy():
    image = np.random.default_rng(0).random((9, 9, 3)).astype(np.float32)
    turned = augment.affine_transform(image, rotation_degrees=90.0).numpy()
    np.testing.assert_allclose(turned, np.rot90(image), atol=1e-5)  # counter-clockwise
    shifted = augment.affine_transform(image, shift=(2.0, -1.0)).numpy()  # 2 right, 1 up
    expected = np.zeros_like(image)
    expected[:-1, 2:] = image[1:, :-2]
    np.testing.assert_allclose(shifted, expected, atol=1e-5)


def test_affine_zoom_out_keeps_the_middle_and_blackens_the_border():
    # Scale 0.5 about the centre (3.5): output pixel p reads input 3.5 + 2 (p - 3.5),
    # inside the 8-pixel image only for p in 2..5.
    out = augment.affine_transform(np.ones((8, 8, 1), np.float32), scale=0.5).numpy()[..., 0]
    inside = np.zeros(8, bool)
    inside[2:6] = True
    np.testing.assert_allclose(out[np.ix_(inside, inside)], 1.0, atol=1e-6)
    assert out[~inside].max() == 0.0 and out[:, ~inside].max() == 0.0


def test_random_affine_stays_within_its_ranges_and_spans_them():
    side, max_shift = 33, 0.25
    dot = np.zeros((side, side, 1), np.float32)
    dot[16, 16] = 1.0  # the centre: rotation and zoom leave it in place, the shift moves it
    tf.random.set_seed(0)
    views = np.stack([
        augment.random_affine(dot, max_rotation_degrees=30.0, max_scale_change=0.2, max_shift=max_shift).numpy()[..., 0]
        for _ in range(60)
    ])
    rows, cols = np.indices((side, side))
    mass = views.sum((1, 2))
    centre_y = (views * rows).sum((1, 2)) / mass - 16
    centre_x = (views * cols).sum((1, 2)) / mass - 16
    bound = max_shift * side
    assert np.abs(centre_y).max() <= bound + 0.5 and np.abs(centre_x).max() <= bound + 0.5
    assert np.ptp(centre_x) > bound and np.ptp(centre_y) > bound


def test_preprocess_applies_the_affine_only_when_asked():
    plain = _views(use_flip=False, crop_min_area=1.0)
    np.testing.assert_allclose(plain, np.broadcast_to(plain[0], plain.shape), atol=1e-6)  # whole image each time
    turned = _views(use_flip=False, crop_min_area=1.0, affine=augment.Affine(rotation_degrees=45.0))
    # Rotations differ from view to view and bring in black corners.
    assert np.abs(turned - plain).max() > 0.5 and (turned[:, 0, 0, 2] == 0).mean() > 0.5


@pytest.mark.parametrize(
    "field,value", [("affine_rotation_degrees", -1.0), ("affine_scale_change", 1.0), ("affine_shift", 0.6),
                    ("affine_shift", float("nan"))]
)
def test_bad_affine_range_names_the_flag(field, value):
    config = config_lib.Config().replace(data={field: value})
    with pytest.raises(config_lib.FlagError, match=f"--{field}"):
        config_lib.validate(config)
