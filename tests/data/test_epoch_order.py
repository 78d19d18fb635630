"""Training order across epochs: every epoch is a new permutation of the whole split."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import build_dataset, get_source
from simclr_tf.data.pipeline import shuffle_buffer_size

NUM_EXAMPLES = 400
BATCH = 8
# Above 32 pixels the shuffle buffer is 10 batches: 80 examples, a fifth of the split.
IMAGE_SIZE = 33
SEED = 5


@pytest.fixture(scope="module")
def coded_folder(tmp_path_factory):
    """Constant PNGs whose red and green levels encode the example index (survive crop and flip)."""
    root = tmp_path_factory.mktemp("coded")
    for i in range(NUM_EXAMPLES):
        path = root / "train" / f"c{i % 4}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (3, 3), (i % 256, i // 256, 0)).save(path)
    return get_source(f"folder:{root}")


def _stream(source, *, cache, start_example, num_examples):
    """Example indices of the training stream from `start_example` on, in batch order."""
    ds = build_dataset(
        source, split="train", batch_size=BATCH, is_training=True, num_views=1, image_size=IMAGE_SIZE,
        color_jitter_strength=0.0, use_blur=False, cache=cache, shuffle_seed=SEED,
        start_example=start_example,
    )
    options = tf.data.Options()
    options.deterministic = True  # the training pipeline allows reordering; compare orders here
    ds = ds.with_options(options)
    images = np.concatenate([b["image"].numpy() for b in ds.take(num_examples // BATCH)])
    levels = np.rint(images[:, 0, 0, :2] * 255).astype(int)  # (N, 2): red, green
    return levels[:, 0] + 256 * levels[:, 1]


def _batch_pairs(indices):
    """Unordered pairs of examples that share a batch."""
    pairs = set()
    for batch in indices.reshape(-1, BATCH):
        pairs.update((a, b) for a in batch for b in batch if a < b)
    return pairs


@pytest.mark.parametrize("cache", [False, True])
def test_batch_mates_change_every_epoch_as_by_chance(coded_folder, cache):
    assert shuffle_buffer_size(BATCH, IMAGE_SIZE) * 5 == NUM_EXAMPLES
    num_epochs = 4
    stream = _stream(coded_folder, cache=cache, start_example=0, num_examples=num_epochs * NUM_EXAMPLES)
    epochs = stream.reshape(num_epochs, NUM_EXAMPLES)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_EXAMPLES))
    # Of the pairs sharing a batch in epoch e, the fraction sharing one again in e + 1.
    # For a uniformly random new order: a pair's partner is one of the B - 1 other
    # places of its batch, among N - 1 places.
    again = total = 0
    for before, after in zip(epochs[:-1], epochs[1:]):
        pairs = _batch_pairs(before)
        again += len(pairs & _batch_pairs(after))
        total += len(pairs)
    chance = (BATCH - 1) / (NUM_EXAMPLES - 1)
    # 4,200 pairs: chance gives ~74 repeats, sd ~8.5; bounds at about 3.5 sd. Reading
    # the same file order every epoch through this buffer gives several times more.
    assert 0.6 * chance < again / total < 1.5 * chance, (again, total, chance)

    # A run resumed in epoch 2, after 3 batches, reads what this one read from there.
    start = 2 * NUM_EXAMPLES + 3 * BATCH
    resumed = _stream(coded_folder, cache=cache, start_example=start, num_examples=len(stream) - start)
    np.testing.assert_array_equal(resumed, stream[start:])
