"""Few-label subsets: NumPy selection rules, then every source and `build_dataset`.

The TFDS path is checked twice: under `tfds.testing.mock_data` (as the other TFDS
tests), and on a tiny dataset written to real TFRecord shards, because the mock
bypasses TFDS's file reader, which is what shuffles, shards and interleaves files.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import LabeledSubset, build_dataset, get_source, labeled_subset_indices
from simclr_tf.data.pipeline import epoch_stream

# Unequal, interleaved classes: 1000, 500, 250, 40 and 3 examples.
CLASS_SIZES = [1000, 500, 250, 40, 3]
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(5), CLASS_SIZES))


def _counts(indices, labels=LABELS):
    return np.bincount(labels[indices], minlength=len(CLASS_SIZES)).tolist()


# --------------------------------------------------------------------------- selection rule


@pytest.mark.parametrize(
    "subset, want",
    [
        # round half up (2.5 -> 3), and never fewer than one per class (0.4, 0.03 -> 1).
        (LabeledSubset(fraction=0.01), [10, 5, 3, 1, 1]),
        (LabeledSubset(fraction=0.1), [100, 50, 25, 4, 1]),
        (LabeledSubset(fraction=0.35), [350, 175, 88, 14, 1]),
        (LabeledSubset(fraction=1.0), CLASS_SIZES),
        (LabeledSubset(per_class=20), [20, 20, 20, 20, 3]),  # capped by the class size
        (LabeledSubset(fraction=0.01, per_class=60), [60, 60, 60, 40, 3]),  # per_class wins
    ],
)
def test_counts_per_class(subset, want):
    indices = labeled_subset_indices(LABELS, subset)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, np.unique(indices))  # sorted, no repeats
    assert _counts(indices) == want


def test_float_noise_does_not_change_the_count():
    # 0.35 * 10 == 3.4999999999999996 in floating point; 3.5 rounds half up to 4.
    assert LabeledSubset(fraction=0.35).count(10) == 4
    assert LabeledSubset(fraction=0.01).count(4500) == 45


def test_deterministic_and_seed_dependent():
    subset = LabeledSubset(fraction=0.1, seed=5)
    first = labeled_subset_indices(LABELS, subset)
    again = labeled_subset_indices(LABELS.copy(), LabeledSubset(fraction=0.1, seed=5))
    np.testing.assert_array_equal(first, again)
    other = labeled_subset_indices(LABELS, LabeledSubset(fraction=0.1, seed=6))
    assert _counts(other) == _counts(first)
    assert len(np.intersect1d(first, other)) < len(first) // 2  # largely different examples


def test_randomised_within_each_class():
    chosen = labeled_subset_indices(LABELS, LabeledSubset(fraction=0.01))
    class0 = chosen[LABELS[chosen] == 0]
    assert not np.array_equal(class0, np.flatnonzero(LABELS == 0)[:10])  # not the first files
    assert not np.array_equal(class0, np.flatnonzero(LABELS == 0)[-10:])


@pytest.mark.parametrize("seed", [0, 7])
def test_nested_for_the_same_seed(seed):
    # Nesting holds whenever every class's count grows: along fractions, along
    # per-class counts, and from one per class to any fraction.
    chains = [
        [dict(per_class=1), dict(fraction=0.01), dict(fraction=0.1), dict(fraction=0.5), dict(fraction=1.0)],
        [dict(per_class=5), dict(per_class=30), dict(fraction=1.0)],
    ]
    for chain in chains:
        subsets = [labeled_subset_indices(LABELS, LabeledSubset(seed=seed, **kwargs)) for kwargs in chain]
        for small, large in zip(subsets, subsets[1:]):
            assert len(small) < len(large)
            assert np.isin(small, large).all()


def test_every_class_keeps_an_example():
    labels = np.array([0] * 5 + [1] + [2] * 7)
    chosen = labeled_subset_indices(labels, LabeledSubset(fraction=0.001))
    assert sorted(labels[chosen].tolist()) == [0, 1, 2]
    assert len(labeled_subset_indices(np.zeros([0], np.int64), LabeledSubset(fraction=0.1))) == 0


def test_is_everything():
    assert LabeledSubset().is_everything
    assert LabeledSubset(seed=3).is_everything
    assert not LabeledSubset(fraction=0.5).is_everything
    assert not LabeledSubset(per_class=100).is_everything


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(fraction=0.0), "--labeled_fraction"),
        (dict(fraction=-0.1), "--labeled_fraction"),
        (dict(fraction=1.5), "--labeled_fraction"),
        (dict(fraction=float("nan")), "--labeled_fraction"),
        (dict(per_class=-1), "--labeled_per_class"),
        (dict(per_class=2.5), "--labeled_per_class"),
        (dict(seed=-1), "--labeled_seed"),
    ],
)
def test_out_of_range_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LabeledSubset(**kwargs)


# --------------------------------------------------------------------------- folder and mnist5k


def _levels(ds):
    """Example ids encoded as the grey level of constant images, and their labels."""
    pairs = [(int(image[0, 0, 0]), int(label)) for image, label in ds.as_numpy_iterator()]
    return [i for i, _ in pairs], [y for _, y in pairs]


@pytest.fixture
def grey_folder(tmp_path):
    """3 classes x 20 constant-grey PNGs; grey level = example id = 20 * class + i."""
    for c in range(3):
        for i in range(20):
            path = tmp_path / "train" / f"c{c}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (5, 5), (20 * c + i,) * 3).save(path)
    return get_source(f"folder:{tmp_path}")


def test_folder_subset_applies_after_slicing(grey_folder):
    subset = LabeledSubset(fraction=0.25, seed=1)
    sliced_ids, sliced_labels = _levels(grey_folder.as_dataset("train[:80%]", shuffle_files=False))
    want = np.array(sliced_ids)[labeled_subset_indices(np.array(sliced_labels), subset)]
    ids, labels = _levels(grey_folder.as_dataset("train[:80%]", shuffle_files=False, labeled_subset=subset))
    # 16 per class in train[:80%], a quarter of them: 4 per class.
    assert grey_folder.num_examples("train[:80%]", subset) == len(ids) == 12
    np.testing.assert_array_equal(ids, want)
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert [i // 20 for i in ids] == labels
    # Shuffled reading keeps the same examples.
    shuffled_ds = grey_folder.as_dataset("train[:80%]", shuffle_files=True, seed=3, labeled_subset=subset)
    shuffled, _ = _levels(shuffled_ds)
    assert sorted(shuffled) == sorted(ids)
    assert grey_folder.num_examples("train[:80%]", LabeledSubset(per_class=100)) == 48


def test_build_dataset_with_subset(grey_folder):
    common = dict(split="train", image_size=5, color_jitter_strength=0.0, use_blur=False, num_views=1)
    subset = LabeledSubset(per_class=3, seed=2)
    want, _ = _levels(grey_folder.as_dataset("train", shuffle_files=False, labeled_subset=subset))
    assert len(want) == 9

    def level(images):
        return np.rint(images.numpy()[:, 0, 0, 0] * 255).astype(int).tolist()

    evaluation = build_dataset(grey_folder, batch_size=4, is_training=False, labeled_subset=subset, **common)
    assert sum((level(b["image"]) for b in evaluation), []) == want
    # Training: the first 9 examples after shuffle-then-repeat are one epoch of the subset.
    training = build_dataset(grey_folder, batch_size=9, is_training=True, labeled_subset=subset, **common)
    batch = next(iter(training))
    assert sorted(level(batch["image"])) == want
    np.testing.assert_array_equal(batch["label"].numpy(), np.array(level(batch["image"])) // 20)
    # No subset and an everything-subset read the whole split, as before.
    for everything in (None, LabeledSubset(seed=4)):
        ds = build_dataset(grey_folder, batch_size=60, is_training=False, labeled_subset=everything, **common)
        assert level(next(iter(ds))["image"]) == list(range(60))


def test_mnist5k_subset_counts_and_nesting():
    source = get_source("mnist5k")
    fingerprints = {}
    for fraction, per_class in [(0.01, 4), (0.1, 40)]:
        subset = LabeledSubset(fraction=fraction)
        ds = source.as_dataset("train", shuffle_files=False, labeled_subset=subset)
        images, labels = next(iter(ds.batch(1000)))
        assert source.num_examples("train", subset) == len(labels) == 10 * per_class
        assert np.bincount(labels.numpy(), minlength=10).tolist() == [per_class] * 10
        fingerprints[fraction] = {image.tobytes() for image in images.numpy()}
    assert fingerprints[0.01] < fingerprints[0.1]
    assert source.num_examples("validation", LabeledSubset(per_class=7)) == 70
    assert source.num_examples("train[:90%]", LabeledSubset(fraction=0.1)) == 360


# --------------------------------------------------------------------------- TFDS (mocked)


def test_tfds_mock_subset_has_exactly_the_chosen_examples(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    num_examples = 60
    # Metadata whose split size matches what the mock generates, as in test_sources.
    with tfds.testing.mock_data(num_examples=5):
        builder = tfds.builder("mnist")
        info_dir = tmp_path / "mnist" / str(builder.version)
        info_dir.mkdir(parents=True)
        builder.info.set_splits(
            tfds.core.SplitDict(
                [tfds.core.SplitInfo(name="train", shard_lengths=[num_examples], num_bytes=0)]
            )
        )
        builder.info.write_to_directory(str(info_dir))
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path)):
        source = get_source("mnist")
        subset = LabeledSubset(fraction=0.3, seed=1)
        full = list(source.as_dataset("train", shuffle_files=False).as_numpy_iterator())
        assert source.num_examples("train") == len(full) == num_examples
        labels = np.array([label for _, label in full])
        want = labeled_subset_indices(labels, subset)
        got = list(source.as_dataset("train", shuffle_files=False, labeled_subset=subset).as_numpy_iterator())
        assert source.num_examples("train", subset) == len(got) == len(want)
        assert len(want) < num_examples // 2
        for (image, label), index in zip(got, want):
            assert image.shape == (28, 28, 3)  # decoded after the filter, gray made RGB
            np.testing.assert_array_equal(image, full[index][0])
            assert label == full[index][1]
        evaluation = build_dataset(
            source, split="train", batch_size=8, is_training=False, num_views=1, image_size=28,
            color_jitter_strength=0.0, use_blur=False, labeled_subset=subset,
        )
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in evaluation]), labels[want])


# --------------------------------------------------------------------------- TFDS (real files)

NUM_TINY = 120


def _tiny_label(index):
    return (index * 7) % 4 if index % 5 else 0  # unequal classes, spread over the files


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """120 constant 6x6 images (grey level = example index) in 4 real TFRecord shards."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class SimclrTfTinyIndexed(tfds.core.GeneratorBasedBuilder):
        # A dotted module name would make TFDS look for the class's source file as a
        # package resource, which needs `importlib_resources`; one part skips that.
        __module__ = "tiny_tfds_builder"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 6, 3)),
                    "label": tfds.features.ClassLabel(num_classes=4),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(NUM_TINY):
                yield i, {"image": np.full((6, 6, 3), i, np.uint8), "label": _tiny_label(i)}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = SimclrTfTinyIndexed(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    assert builder.info.splits["train"].num_shards == 4
    return get_source("simclr_tf_tiny_indexed", data_dir=data_dir)


def test_tfds_files_subset_survives_shuffling_sharding_and_nondeterminism(tiny_tfds):
    tfds = pytest.importorskip("tensorflow_datasets")
    split, subset = "train[:75%]", LabeledSubset(fraction=0.2, seed=3)
    # The subset is defined on the split in file order (file by file, records in order),
    # whatever order TFDS reads them in.
    in_file_order = tiny_tfds._builder.as_dataset(
        split, as_supervised=True, read_config=tfds.ReadConfig(interleave_cycle_length=1)
    )
    sliced, sliced_labels = _levels(in_file_order)
    assert len(sliced) == 90 and sliced_labels == [_tiny_label(i) for i in sliced]
    want = sorted(np.array(sliced)[labeled_subset_indices(np.array(sliced_labels), subset)].tolist())
    assert tiny_tfds.num_examples(split, subset) == len(want)
    assert np.bincount([_tiny_label(i) for i in want]).tolist() == [
        subset.count(n) for n in np.bincount(sliced_labels)
    ]

    got, labels = _levels(tiny_tfds.as_dataset(split, shuffle_files=True, seed=1, labeled_subset=subset))
    assert sorted(got) == want and labels == [_tiny_label(i) for i in got]

    # Two input pipelines read different files and together see the subset once.
    shards = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
        shard = tiny_tfds.as_dataset(split, shuffle_files=True, input_context=context, labeled_subset=subset)
        ids, _ = _levels(shard)
        shards.append(ids)
    assert shards[0] and shards[1] and sorted(shards[0] + shards[1]) == want

    # The training pipeline runs with deterministic=False; one epoch is still the subset.
    training = build_dataset(
        tiny_tfds, split=split, batch_size=len(want), is_training=True, num_views=1, image_size=6,
        color_jitter_strength=0.0, use_blur=False, labeled_subset=subset,
    )
    batch = next(iter(training))
    levels = np.rint(batch["image"].numpy()[:, 0, 0, 0] * 255).astype(int)
    assert sorted(levels.tolist()) == want
    assert batch["label"].numpy().tolist() == [_tiny_label(i) for i in levels]


def test_tfds_files_subset_is_nested_and_cached(tiny_tfds):
    small = tiny_tfds.as_dataset("train", shuffle_files=False, labeled_subset=LabeledSubset(fraction=0.1))
    large = tiny_tfds.as_dataset("train", shuffle_files=False, labeled_subset=LabeledSubset(fraction=0.5))
    small_ids, large_ids = set(_levels(small)[0]), set(_levels(large)[0])
    assert small_ids < large_ids
    assert "train" in tiny_tfds._labels_cache  # the label pass ran once for both


def test_tfds_file_order_changes_every_epoch(tiny_tfds):
    # No buffer shuffle (buffer_size=1): the stream is the order TFDS reads records in,
    # 4 files interleaved, so it changes only when the order of the files does.
    def epochs(start_epoch, count, subset=None):
        kwargs = {} if subset is None else {"labeled_subset": subset}
        size = tiny_tfds.num_examples("train", **kwargs)
        ds = epoch_stream(
            lambda seed: tiny_tfds.as_dataset("train", shuffle_files=True, seed=seed, **kwargs),
            buffer_size=1, seed=2, epoch_size=size, start_example=start_epoch * size,
        )
        return np.reshape(_levels(ds.take(count * size))[0], (count, size))

    orders = epochs(0, 4)
    for order in orders:
        assert sorted(order) == list(range(NUM_TINY))
    assert len({tuple(order) for order in orders}) > 1
    # Epoch 3 read on its own (a resumed run) is epoch 3 of the stream read from the start.
    np.testing.assert_array_equal(epochs(3, 1)[0], orders[3])
    # A labeled subset is still exactly the chosen examples in every epoch.
    subset = LabeledSubset(fraction=0.3, seed=1)
    chosen = epochs(0, 3, subset)
    assert chosen.shape[1] < NUM_TINY // 2
    for order in chosen:
        np.testing.assert_array_equal(np.sort(order), np.sort(chosen[0]))


# --------------------------------------------------------------------------- real CIFAR-10


def test_cifar10_folder_few_labels(cifar10_root):
    source = get_source(f"folder:{cifar10_root}")
    one = LabeledSubset(fraction=0.01)
    paths, labels = source._select("train[:90%]", one)
    assert source.num_examples("train[:90%]", one) == len(paths) == 450
    assert np.bincount(labels, minlength=10).tolist() == [45] * 10
    assert source.num_examples("train[:90%]", LabeledSubset(fraction=0.1)) == 4_500
    assert set(paths) <= set(source._select("train[:90%]", LabeledSubset(fraction=0.1))[0])
    assert not set(paths) & set(source._select("train[90%:]")[0])  # never from the held-out slice
    assert all(os.path.basename(os.path.dirname(p)) == source.class_names[y] for p, y in zip(paths, labels))
    produced = sum(1 for _ in source.as_dataset("train[:90%]", shuffle_files=False, labeled_subset=one))
    assert produced == 450
