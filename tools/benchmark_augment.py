"""Images/s of the semi-supervised weak and strong augmentations in a tf.data pipeline.

Times `simclr_tf.data.semi_augment` (stateless, seeded per example) against the same
recipe built from Keras 3 layers (RandomFlip + RandomTranslation for weak; then
RandAugment + RandomErasing for strong), back to back and interleaved over --repeats
rounds, on decoded images cached in memory (so decoding is not timed):

  nice -n 5 python tools/benchmark_augment.py [--data_dir=../shared/datasets/cifar10/train | --synthetic] \
      [--num_images=5000] [--repeats=3]

Also checks, for the Keras variant, whether two runs of the same pipeline give the same
images (what an exact resume needs) and whether RandAugment follows the seed passed to
`get_random_transformation`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import simclr_tf  # noqa: E402,F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
import tensorflow as tf  # noqa: E402

from simclr_tf.data import semi_augment  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "datasets" / "cifar10" / "train"),
                        help="Folder of <class>/<image> files (JPEG/PNG).")
    parser.add_argument("--synthetic", action="store_true", help="Random uint8 images instead of --data_dir.")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=5000, help="Images per timed pass.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved rounds; the median is reported.")
    parser.add_argument("--keras_factor", type=float, default=0.5, help="keras.layers.RandAugment's factor.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def source(args: argparse.Namespace) -> tf.data.Dataset:
    """Decoded uint8 images, cached in memory after a first pass."""
    if args.synthetic:
        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
        return tf.data.Dataset.from_tensor_slices(images)
    root = pathlib.Path(args.data_dir)
    files = sorted(str(p) for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"No images under {root}/<class>/: pass --data_dir=<folder> or --synthetic")
    files = files[: args.num_images]
    ds = tf.data.Dataset.from_tensor_slices(files).map(
        lambda p: tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.cache()
    for _ in ds:  # fill the cache
        pass
    return ds


def ours(args: argparse.Namespace) -> dict[str, Callable]:
    size, base = args.image_size, args.seed

    def seeded(fn):
        return lambda i, x: fn(x, image_size=size, seed=tf.stack([tf.constant(base, tf.int64), i]))

    weak = seeded(semi_augment.weak_augment)
    strong = seeded(semi_augment.strong_augment)
    return {"weak": weak, "strong": strong, "weak+strong": lambda i, x: (weak(i, x), strong(i, x))}


def keras_layers(args: argparse.Namespace) -> dict[str, Callable]:
    size, fraction = args.image_size, 0.5
    weak_layers = [
        keras.layers.RandomFlip("horizontal", seed=args.seed),
        keras.layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", interpolation="nearest", seed=args.seed),
    ]
    rand_augment = keras.layers.RandAugment(value_range=(0, 1), num_ops=2, factor=args.keras_factor, seed=args.seed)
    erasing = keras.layers.RandomErasing(
        factor=(1.0, 1.0), scale=(fraction**2, fraction**2), fill_value=0.5, value_range=(0, 1), seed=args.seed
    )

    def weak(_, x):
        x = semi_augment.to_image_size(x, size)  # the same conversion as ours, not timed apart
        for layer in weak_layers:
            x = layer(x, training=True)
        return x

    def strong(i, x):
        return erasing(rand_augment(weak(i, x), training=True), training=True)

    return {"weak": weak, "strong": strong, "weak+strong": lambda i, x: (weak(i, x), strong(i, x))}


def throughput(ds: tf.data.Dataset, fn: Callable, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s wall clock, microseconds of process CPU time per image) over one pass.

    CPU time per image is the steadier figure on a machine shared with other jobs.
    """
    pipeline = ds.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(args.batch_size)
    pipeline = pipeline.prefetch(tf.data.AUTOTUNE)
    it = iter(pipeline)
    next(it)  # tracing and warm-up
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for batch in it:
        first = batch[0] if isinstance(batch, tuple) else batch
        count += int(first.shape[0])
    cpu = time.process_time() - cpu_start
    return count / (time.perf_counter() - start), cpu / count * 1e6


def keras_checks(ds: tf.data.Dataset, args: argparse.Namespace) -> None:
    """Is the Keras variant reproducible, and does RandAugment follow a given seed?"""
    small = ds.take(256)

    def run(fns):
        pipeline = small.enumerate().map(fns["strong"], num_parallel_calls=tf.data.AUTOTUNE).batch(256)
        return pipeline.get_single_element().numpy()

    print(f"ours, two runs identical:  {np.array_equal(run(ours(args)), run(ours(args)))}")
    keras_fns = keras_layers(args)
    print(f"keras, same layers, two runs identical: {np.array_equal(run(keras_fns), run(keras_fns))}")
    fresh = np.array_equal(run(keras_layers(args)), run(keras_layers(args)))
    print(f"keras, fresh layers same seed, two runs identical: {fresh}")
    layer = keras.layers.RandAugment(value_range=(0, 1), seed=args.seed)
    image = tf.random.stateless_uniform([args.image_size, args.image_size, 3], [1, 2])
    draws = [layer.get_random_transformation(image, training=True, seed=tf.constant([5, 6]))["layer_idxes"].numpy()
             for _ in range(8)]
    print(f"RandAugment.get_random_transformation(seed=fixed), op indices over 8 calls: {[d.tolist() for d in draws]}")
    out = run(keras_fns)
    print(f"keras strong output: dtype {out.dtype}, range [{out.min():.3f}, {out.max():.3f}]")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ds = source(args)
    n = sum(1 for _ in ds)
    print(f"{n} images ({'synthetic' if args.synthetic else args.data_dir}), image_size {args.image_size}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}")
    keras_checks(ds, args)
    variants = {"ours": ours(args), "keras": keras_layers(args)}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for impl, fns in variants.items():
            for name, fn in fns.items():
                results.setdefault((impl, name), []).append(throughput(ds, fn, args))
    print(f"\nmedian of {args.repeats} interleaved rounds: images/s (wall clock) and us of CPU per image")
    header = ("augmentation", "ours img/s", "keras img/s", "ours us CPU", "keras us CPU", "keras/ours CPU")
    print(f"{header[0]:<14}" + "".join(f"{h:>{len(h) + 2}}" for h in header[1:]))
    for name in ("weak", "strong", "weak+strong"):
        rate = {impl: statistics.median(r for r, _ in results[(impl, name)]) for impl in variants}
        cpu = {impl: statistics.median(c for _, c in results[(impl, name)]) for impl in variants}
        print(f"{name:<14}{rate['ours']:>12.0f}{rate['keras']:>13.0f}{cpu['ours']:>13.0f}{cpu['keras']:>14.0f}"
              f"{cpu['keras'] / cpu['ours']:>15.2f}x")


if __name__ == "__main__":
    main()
