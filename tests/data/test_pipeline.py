"""build_dataset: layout of views, label alignment, eval coverage, sharding, distribution."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import build_dataset, get_source
from simclr_tf.data.pipeline import shuffle_buffer_size

NUM_EXAMPLES = 22
NUM_CLASSES = 3
STEP = 10  # colour step between examples: grey level = STEP * index


def _class_of(index):
    return index % NUM_CLASSES


@pytest.fixture
def index_folder(tmp_path):
    """Constant-grey PNGs whose grey level encodes the example index (lossless).

    Any crop or flip of a constant image is the same constant, so after crop/flip
    augmentation every view still tells which example it came from.
    """
    for i in range(NUM_EXAMPLES):
        path = tmp_path / "train" / f"class{_class_of(i)}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (9 + i, 7 + 2 * i)  # sizes vary per image
        Image.new("RGB", size, (STEP * i,) * 3).save(path)
    return get_source(f"folder:{tmp_path}")


def _indices(images):
    """(N, S, S, 3) constant images -> the encoded example index of each."""
    levels = images.numpy().reshape(images.shape[0], -1)
    assert np.allclose(levels.min(1), levels.max(1), atol=1e-4), "views must stay constant"
    return np.rint(levels.mean(1) * 255 / STEP).astype(int)


def _build(source, **overrides):
    kwargs = dict(
        split="train", batch_size=4, is_training=True, num_views=2, image_size=16,
        color_jitter_strength=0.0, use_blur=False,
    )
    kwargs.update(overrides)
    return build_dataset(source, **kwargs)


def test_training_batches_are_view_major_with_aligned_labels(index_folder):
    ds = _build(index_folder, shuffle_seed=0, num_views=3)
    assert ds.element_spec["image"] == tf.TensorSpec([12, 16, 16, 3], tf.float32)
    assert ds.element_spec["label"] == tf.TensorSpec([4], tf.int32)
    seen = []
    for batch in ds.take(15):  # more than one epoch: the dataset repeats
        views = _indices(batch["image"]).reshape(3, 4)  # (V, B)
        np.testing.assert_array_equal(views[0], views[1])
        np.testing.assert_array_equal(views[0], views[2])
        np.testing.assert_array_equal(batch["label"].numpy(), [_class_of(i) for i in views[0]])
        seen.extend(views[0])
    assert set(seen) == set(range(NUM_EXAMPLES))
    assert seen[:NUM_EXAMPLES] != sorted(seen[:NUM_EXAMPLES])  # shuffled


def test_training_views_differ_under_full_augmentation():
    source = get_source("mnist5k")
    ds = _build(source, split="train[:5%]", batch_size=8, image_size=28, color_jitter_strength=1.0, use_blur=True)
    batch = next(iter(ds))
    images = batch["image"].numpy()
    assert images.shape == (16, 28, 28, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert batch["label"].dtype == tf.int32
    assert not np.allclose(images[:8], images[8:])


def test_eval_is_one_ordered_pass_keeping_the_last_batch(index_folder):
    ds = _build(index_folder, is_training=False, num_views=1, batch_size=8, cache=True)
    for _ in range(2):  # a cached eval set can be iterated again
        batches = list(ds)
        assert [int(b["label"].shape[0]) for b in batches] == [8, 8, 6]
        index = np.concatenate([_indices(b["image"]) for b in batches])
        labels = np.concatenate([b["label"].numpy() for b in batches])
        # Sorted by class folder, then file name.
        want = sorted(range(NUM_EXAMPLES), key=lambda i: (_class_of(i), i))
        np.testing.assert_array_equal(index, want)
        np.testing.assert_array_equal(labels, [_class_of(i) for i in want])


def test_eval_rejects_multiple_views(index_folder):
    with pytest.raises(ValueError, match="num_views=1"):
        _build(index_folder, is_training=False, num_views=2)


@pytest.mark.parametrize("is_training", [False, True])
def test_input_context_shards_examples(index_folder, is_training):
    shards = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        ds = _build(index_folder, is_training=is_training, num_views=2 if is_training else 1,
                    input_context=context, batch_size=3)
        batches = list(ds.take(12)) if is_training else list(ds)
        half = lambda b: b["image"][: b["label"].shape[0]]  # noqa: E731 - first view
        shards.append(set(np.concatenate([_indices(half(b)) for b in batches])))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(NUM_EXAMPLES))


def test_training_options_and_shuffle_buffer(index_folder):
    assert not _build(index_folder).options().deterministic
    assert _build(index_folder, is_training=False, num_views=1).options().deterministic is not False
    assert shuffle_buffer_size(128, 32) == 6400 and shuffle_buffer_size(128, 224) == 1280


def test_per_replica_batches_under_mirrored_strategy(two_cpu_strategy):
    """Each replica gets a whole view-major batch from its own pipeline call."""
    source = get_source("mnist5k")
    global_batch = 8

    def dataset_fn(context):
        return build_dataset(
            source, split="validation", batch_size=context.get_per_replica_batch_size(global_batch),
            is_training=True, num_views=2, image_size=28, color_jitter_strength=0.0,
            use_blur=False, input_context=context,
        )

    dist = two_cpu_strategy.distribute_datasets_from_function(dataset_fn)
    batch = next(iter(dist))
    images = two_cpu_strategy.experimental_local_results(batch["image"])
    labels = two_cpu_strategy.experimental_local_results(batch["label"])
    assert len(images) == 2
    for image, label in zip(images, labels):
        assert image.shape == (8, 28, 28, 3) and label.shape == (4,)
