"""`build_dataset`: a source's split -> batches of augmented views for one replica."""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from simclr_tf.data.augment import CROP_AREA_RANGE, Affine, preprocess_for_eval, preprocess_for_train
from simclr_tf.data.sources import LabeledSubset, Source

# Epoch e's shuffle seed is seed * stride + e + 1: distinct per (seed, epoch), never 0.
_EPOCH_SEED_STRIDE = 1_000_003
# TensorFlow's own default graph seed, so orders are those of an unseeded process.
_EPOCH_GRAPH_SEED = 87654321
# Epoch e's order seed (the permutation of the files) is its shuffle seed plus this.
_ORDER_SEED_OFFSET = 2**40
# Input pipeline p's view seeds start at (shuffle seed * this + p).
_PIPELINE_SEED_STRIDE = 4099

# A seeded view: (one decoded image, a shape-[2] int64 stateless seed) -> (S, S, 3) float32.
ViewFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def shuffle_buffer_size(batch_size: int, image_size: int) -> int:
    """Shuffle buffer as the original: 50 batches for small images, else 10."""
    return batch_size * (50 if image_size <= 32 else 10)


def epoch_stream(
    ds: tf.data.Dataset | Callable[[tf.Tensor | None], tf.data.Dataset],
    *,
    buffer_size: int,
    seed: int | None,
    epoch_size: int,
    start_example: int = 0,
) -> tf.data.Dataset:
    """Endless shuffled epochs of `ds`, starting at example `start_example` of the stream.

    `ds` is either a dataset that reads the same order on every pass, or a function
    of an epoch's order seed (an int64 scalar tensor; None when `seed` is None)
    returning that epoch's dataset, e.g. the files in a permutation of that seed.
    Epoch e is then shuffled with a buffer of `buffer_size` and a seed made of
    (seed, e). Both seeds depend only on (seed, e), not on how many epochs this
    process has already read: a run resumed at example k = e * epoch_size + i
    continues with the examples an uninterrupted run would have read (epoch e, from
    position i). `seed=None` shuffles each epoch at random.
    """
    if epoch_size < 1:
        raise ValueError(f"Cannot train on an empty dataset (epoch_size={epoch_size}).")
    start_epoch, offset = divmod(start_example, epoch_size)

    # The dataset functions here have no Python control flow on tensors: skipping
    # AutoGraph's source conversion saves seconds of tracing at each start.
    @tf.autograph.experimental.do_not_convert
    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        if seed is None:
            epoch_seed = order_seed = None
        else:
            # Pin the graph-level half of the shuffle seeds in this function's graph: the
            # order must not depend on a user's tf.random.set_seed, and a global seed of 0
            # would make TensorFlow test our tensor op seed as a Python bool and fail.
            tf.compat.v1.get_default_graph().seed = _EPOCH_GRAPH_SEED
            epoch_seed = seed * _EPOCH_SEED_STRIDE + epoch + 1
            # A seed of its own for the epoch's order, so that the two shuffles of one
            # epoch do not draw the same random numbers.
            order_seed = epoch_seed + _ORDER_SEED_OFFSET
        data = ds if isinstance(ds, tf.data.Dataset) else ds(order_seed)
        return data.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)

    # `skip` reads the skipped examples (from the cache when there is one) but does
    # not augment them.
    return tf.data.Dataset.counter(start_epoch).flat_map(one_epoch).skip(offset)


def build_dataset(
    source: Source,
    *,
    split: str,
    batch_size: int,
    is_training: bool,
    num_views: int,
    image_size: int,
    color_jitter_strength: float,
    use_blur: bool,
    use_flip: bool = True,
    crop_min_area: float = CROP_AREA_RANGE[0],
    affine: Affine | None = None,
    view_fns: Sequence[ViewFn] | None = None,
    cache: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_seed: int | None = None,
    labeled_subset: LabeledSubset | None = None,
    start_example: int = 0,
) -> tf.data.Dataset:
    """Batches of `{"image": float32 (num_views*B, S, S, 3) in [0, 1], "label": int32 (B,)}`.

    Views are view-major along the batch axis: `image[v*B:(v+1)*B]` is view v of the
    B examples whose labels are `label`, in the same order.

    Training: shuffles, repeats forever, drops the last partial batch, and gives each
    view an independent `preprocess_for_train` draw (`use_flip`, `crop_min_area`,
    `affine` passed on). Eval: one ordered pass keeping the
    last partial batch, with `preprocess_for_eval` (needs `num_views == 1`).
    `batch_size` is per replica; `input_context` selects this input pipeline's shard.
    `cache` keeps the decoded uint8 images in memory (before augmentation).
    `shuffle_seed` fixes the shuffle orders, not SimCLR's augmentations; their
    output order is still non-deterministic (parallel map with `deterministic=False`).
    `labeled_subset` keeps only a fixed class-balanced subset of the (sliced) split,
    e.g. 1% of the labels for semi-supervised fine-tuning; None or one that
    `is_everything` reads the whole split.
    Training order: epoch e reads this pipeline's share of the split in a new
    permutation (the source's files shuffled with a seed made of (`shuffle_seed`,
    e); with `cache`, the whole cached share permuted), then shuffles it with a
    buffer, see `epoch_stream`. So batch-mates change every epoch, and
    `start_example` (this pipeline's examples already read by the run being
    resumed) starts the stream at the epoch and position it had reached.
    `view_fns` (training only) replace SimCLR's augmentation: view v of the example at
    position i of this pipeline's stream is `view_fns[v](image, seed)` with a stateless
    seed made of (`shuffle_seed`, pipeline, i, v), so a resumed run augments exactly
    as an uninterrupted one (`num_views` is then `len(view_fns)`).
    """
    if view_fns is not None:
        if not is_training:
            raise ValueError("view_fns are for training; evaluation has one fixed view.")
        num_views = len(view_fns)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}.")
    if not is_training and num_views != 1:
        raise ValueError("The eval pipeline is deterministic and yields one view; use num_views=1.")

    # Only pass a seed or subset when one is given, so any object following the
    # Source protocol without those arguments still works.
    subset_kwargs = {}
    if labeled_subset is not None and not labeled_subset.is_everything:
        subset_kwargs["labeled_subset"] = labeled_subset

    def read(shuffle_files: bool, seed: tf.Tensor | None = None) -> tf.data.Dataset:
        seed_kwargs = {} if seed is None else {"seed": seed}
        return source.as_dataset(
            split, shuffle_files=shuffle_files, input_context=input_context, **subset_kwargs, **seed_kwargs
        )

    # In file order (eagerly, outside any tf.function): evaluation reads it, and
    # training counts an epoch with it.
    ds = read(shuffle_files=False)
    if cache:
        ds = ds.cache()

    if is_training:
        epoch_size = _examples_per_pass(ds, source, split, labeled_subset, input_context)
        if cache:
            # Decode once, keep the images in file order, and permute the whole cached
            # split each epoch: the shuffle buffer holds references to the cached
            # tensors, not copies. The split's size bounds every shard's.
            cached = ds
            full_split = source.num_examples(split, **subset_kwargs)

            def epoch_data(order_seed: tf.Tensor | None) -> tf.data.Dataset:
                return cached.shuffle(full_split, seed=order_seed, reshuffle_each_iteration=False)

        else:
            # The source reads its files in a new permutation each epoch, decoding only
            # what the shuffle buffer needs.
            def epoch_data(order_seed: tf.Tensor | None) -> tf.data.Dataset:
                return read(shuffle_files=True, seed=order_seed)

        @tf.autograph.experimental.do_not_convert
        def make_views(image: tf.Tensor, label: tf.Tensor) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
            views = tuple(
                preprocess_for_train(
                    image,
                    image_size,
                    color_jitter_strength=color_jitter_strength,
                    use_blur=use_blur,
                    use_flip=use_flip,
                    crop_min_area=crop_min_area,
                    affine=affine,
                )
                for _ in range(num_views)
            )
            return views, tf.cast(label, tf.int32)

        ds = epoch_stream(
            epoch_data,
            buffer_size=shuffle_buffer_size(batch_size, image_size),
            seed=shuffle_seed,
            epoch_size=epoch_size,
            start_example=start_example,
        )
        if view_fns is not None:
            pipeline = input_context.input_pipeline_id if input_context is not None else 0
            base_seed = (shuffle_seed or 0) * _PIPELINE_SEED_STRIDE + pipeline
            ds = ds.enumerate(start_example)

            @tf.autograph.experimental.do_not_convert
            def make_views(position: tf.Tensor, example: tuple[tf.Tensor, tf.Tensor]):
                image, label = example
                views = tuple(
                    fn(image, tf.stack([tf.constant(base_seed, tf.int64), position * num_views + v]))
                    for v, fn in enumerate(view_fns)
                )
                return views, tf.cast(label, tf.int32)
    else:

        @tf.autograph.experimental.do_not_convert
        def make_views(image: tf.Tensor, label: tf.Tensor) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
            return (preprocess_for_eval(image, image_size),), tf.cast(label, tf.int32)

    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=is_training)

    @tf.autograph.experimental.do_not_convert
    def to_features(views: tuple[tf.Tensor, ...], label: tf.Tensor) -> dict[str, tf.Tensor]:
        # V x (B, S, S, 3) -> (V*B, S, S, 3): views as extra batch entries, view-major.
        image = views[0] if len(views) == 1 else tf.concat(views, axis=0)
        return {"image": image, "label": label}

    ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if is_training and view_fns is None:
        options = tf.data.Options()
        options.deterministic = False  # order does not matter after shuffling; speed does
        ds = ds.with_options(options)
    # With seeded views the order is kept too, so a resumed run's batches are exactly
    # those an uninterrupted run would have read.
    return ds


def _examples_per_pass(
    ds: tf.data.Dataset,
    source: Source,
    split: str,
    labeled_subset: LabeledSubset | None,
    input_context: tf.distribute.InputContext | None,
) -> int:
    """Examples in one pass of this pipeline's shard: exact when tf.data knows, else estimated."""
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    # Filtered or file-sharded reads (TFDS subsets, skipped bad images): an even share.
    kwargs = {} if labeled_subset is None or labeled_subset.is_everything else {"labeled_subset": labeled_subset}
    pipelines = input_context.num_input_pipelines if input_context is not None else 1
    return max(1, -(-source.num_examples(split, **kwargs) // pipelines))
