"""Writes corrupted copies of a split as image folders: shifted targets for `--train_mode=adapt`.

    python tools/corrupt_images.py --dataset=folder:../shared/datasets/cifar10 \
        --split='train[90%:]' --output_dir=runs/cifar10_corrupted

For every corruption and severity (`simclr_tf/data/corruptions.py`: Gaussian noise and
blur, contrast, JPEG; severities 1-5, CIFAR-10-C's strengths) it writes
`<output_dir>/<corruption>_<severity>/train/<class>/<index>.png` (lossless PNG; the JPEG
corruption is decoded first), so each is a folder dataset:
`--dataset=folder:<output_dir>/gaussian_noise_3`. The images of `--split` keep their order
and class folders; the noise of image i is drawn from a generator seeded with (--seed,
corruption, severity, i), so a file does not depend on which others are written. Carve the
split from the source's training images as the source model's runs did (e.g. its
`--eval_split`), so the target holds no image the model trained on.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import simclr_tf  # noqa: E402,F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
import tensorflow as tf  # noqa: E402

from simclr_tf.data import corruptions, get_source  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="mnist5k, folder:/path or a TFDS name (as run.py).")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory.")
    parser.add_argument("--split", default="train[90%:]", help="The images to corrupt (TFDS-style slicing).")
    parser.add_argument("--corruptions", default=",".join(corruptions.CORRUPTIONS),
                        help=f"Comma-separated, from {', '.join(corruptions.CORRUPTIONS)}.")
    parser.add_argument("--severities", default="1,2,3,4,5", help="Comma-separated, 1-5.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    args.corruptions = [c for c in args.corruptions.split(",") if c]
    unknown = [c for c in args.corruptions if c not in corruptions.CORRUPTIONS]
    if unknown:
        parser.error(f"--corruptions: unknown {unknown}; use {', '.join(corruptions.CORRUPTIONS)}.")
    try:
        args.severities = [int(s) for s in args.severities.split(",") if s]
    except ValueError:
        parser.error(f"--severities: {args.severities!r} is not a comma-separated list of 1-5.")
    if not args.severities or any(s not in corruptions.SEVERITIES for s in args.severities):
        parser.error(f"--severities: {args.severities} must be in 1-5.")
    return args


def image_seed(seed: int, corruption: str, severity: int, index: int) -> list[int]:
    return [seed, corruptions.CORRUPTIONS.index(corruption), severity, index]


def write_corrupted(args: argparse.Namespace) -> dict[str, int]:
    """Writes every (corruption, severity) folder; returns images written per folder."""
    source = get_source(args.dataset, args.data_dir)
    examples = list(source.as_dataset(args.split, shuffle_files=False).as_numpy_iterator())
    written = {}
    for corruption in args.corruptions:
        for severity in args.severities:
            name = f"{corruption}_{severity}"
            split_dir = os.path.join(args.output_dir, name, "train")
            for class_name in source.class_names:  # every class, so the label map is the source's
                os.makedirs(os.path.join(split_dir, class_name), exist_ok=True)
            for index, (image, label) in enumerate(examples):
                rng = np.random.default_rng(image_seed(args.seed, corruption, severity, index))
                corrupted = corruptions.corrupt(image, corruption, severity, rng)
                path = os.path.join(split_dir, source.class_names[int(label)], f"{index:06d}.png")
                tf.io.write_file(path, tf.io.encode_png(corrupted))
            written[name] = len(examples)
            print(f"[corrupt_images] {split_dir}: {len(examples)} images", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    write_corrupted(parse_args(argv))


if __name__ == "__main__":
    main()
