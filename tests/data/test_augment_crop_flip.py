"""--crop_min_area and --use_flip: measured on views of an image that encodes its coordinates."""

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


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_bad_crop_min_area_names_the_flag(value):
    config = config_lib.Config().replace(data={"crop_min_area": value})
    with pytest.raises(config_lib.FlagError, match="--crop_min_area"):
        config_lib.validate(config)
