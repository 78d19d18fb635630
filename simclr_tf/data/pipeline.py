"""`build_dataset`: a source's split -> batches of augmented views for one replica."""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.augment import preprocess_for_eval, preprocess_for_train
from simclr_tf.data.sources import LabeledSubset, Source


def shuffle_buffer_size(batch_size: int, image_size: int) -> int:
    """Shuffle buffer as the original: 50 batches for small images, else 10."""
    return batch_size * (50 if image_size <= 32 else 10)


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
    cache: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_seed: int | None = None,
    labeled_subset: LabeledSubset | None = None,
) -> tf.data.Dataset:
    """Batches of `{"image": float32 (num_views*B, S, S, 3) in [0, 1], "label": int32 (B,)}`.

    Views are view-major along the batch axis: `image[v*B:(v+1)*B]` is view v of the
    B examples whose labels are `label`, in the same order.

    Training: shuffles, repeats forever, drops the last partial batch, and gives each
    view an independent `preprocess_for_train` draw. Eval: one ordered pass keeping the
    last partial batch, with `preprocess_for_eval` (needs `num_views == 1`).
    `batch_size` is per replica; `input_context` selects this input pipeline's shard.
    `cache` keeps the decoded uint8 images in memory (before augmentation).
    `shuffle_seed` fixes the shuffle orders, not the augmentations; training output
    order is still non-deterministic (parallel map with `deterministic=False`).
    `labeled_subset` keeps only a fixed class-balanced subset of the (sliced) split,
    e.g. 1% of the labels for semi-supervised fine-tuning; None or one that
    `is_everything` reads the whole split.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}.")
    if not is_training and num_views != 1:
        raise ValueError("The eval pipeline is deterministic and yields one view; use num_views=1.")

    # Only pass a seed or subset when one is given, so any object following the
    # Source protocol without those arguments still works.
    source_kwargs = {} if shuffle_seed is None else {"seed": shuffle_seed}
    if labeled_subset is not None and not labeled_subset.is_everything:
        source_kwargs["labeled_subset"] = labeled_subset
    ds = source.as_dataset(split, shuffle_files=is_training, input_context=input_context, **source_kwargs)
    if cache:
        ds = ds.cache()

    if is_training:

        def make_views(image: tf.Tensor, label: tf.Tensor) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
            views = tuple(
                preprocess_for_train(
                    image,
                    image_size,
                    color_jitter_strength=color_jitter_strength,
                    use_blur=use_blur,
                )
                for _ in range(num_views)
            )
            return views, tf.cast(label, tf.int32)

        ds = ds.shuffle(shuffle_buffer_size(batch_size, image_size), seed=shuffle_seed)
        ds = ds.repeat()
    else:

        def make_views(image: tf.Tensor, label: tf.Tensor) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
            return (preprocess_for_eval(image, image_size),), tf.cast(label, tf.int32)

    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=is_training)

    def to_features(views: tuple[tf.Tensor, ...], label: tf.Tensor) -> dict[str, tf.Tensor]:
        # V x (B, S, S, 3) -> (V*B, S, S, 3): views as extra batch entries, view-major.
        image = views[0] if len(views) == 1 else tf.concat(views, axis=0)
        return {"image": image, "label": label}

    ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if is_training:
        options = tf.data.Options()
        options.deterministic = False  # order does not matter after shuffling; speed does
        ds = ds.with_options(options)
    return ds
