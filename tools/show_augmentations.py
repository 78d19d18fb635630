"""A PNG grid of images and their SimCLR training views, to look at before a long run.

    python tools/show_augmentations.py --dataset=mnist5k --image_size=28
    python tools/show_augmentations.py --dataset=folder:/data/cifar10 --output=/tmp/cifar_aug.png
    python tools/show_augmentations.py --dataset=imagenet2012 --data_dir=~/tensorflow_datasets \
        --image_size=224 --color_jitter_strength=1.0 --use_blur=true

Rows are examples, labelled with their class. Columns: the eval view (what the model
sees at evaluation, `preprocess_for_eval`), then two independent pretraining views
(`preprocess_for_train`, the functions `build_dataset` maps). Small images are
upscaled with nearest neighbour so their pixels stay visible. Takes a few seconds,
mostly importing TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import textwrap

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import simclr_tf  # noqa: E402,F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
import tensorflow as tf  # noqa: E402

from simclr_tf.data import Source, get_source, preprocess_for_eval, preprocess_for_train  # noqa: E402

COLUMNS = ("original (eval view)", "view 1", "view 2")
GAP = 4  # white pixels between cells
DISPLAY_SIZE = 128  # images are upscaled by an integer factor to about this size
_SCAN_LIMIT = 500  # examples read at most while looking for distinct classes


def upscale_factor(image_size: int) -> int:
    """Integer nearest-neighbour factor that shows an `image_size` image at about DISPLAY_SIZE px."""
    return max(1, DISPLAY_SIZE // image_size)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255], rounded."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def pick_examples(
    source: Source, *, split: str, num_images: int, seed: int
) -> tuple[list[np.ndarray], list[int]]:
    """`num_images` random examples as uint8 (H, W, 3) images and labels, sorted by label.

    Takes one example per class first (among the first few hundred of a seeded
    shuffle) so the grid shows as many classes as it has rows.
    """
    tf.random.set_seed(seed)
    ds = source.as_dataset(split, shuffle_files=True, seed=seed)
    # Sources shuffle files (TFDS) or the whole list (folder, mnist5k); this mixes TFDS
    # records within files too.
    ds = ds.shuffle(_SCAN_LIMIT, seed=seed).take(_SCAN_LIMIT)
    picked, spare, seen = [], [], set()
    for image, label in ds.as_numpy_iterator():
        label = int(label)
        (spare if label in seen else picked).append((image, label))
        seen.add(label)
        enough = len(picked) + len(spare) >= num_images
        if len(picked) == num_images or (enough and len(seen) == source.num_classes):
            break
    chosen = sorted((picked + spare)[:num_images], key=lambda example: example[1])
    if len(chosen) < num_images:
        raise ValueError(f"Split {split!r} of {source.name} has only {len(chosen)} examples.")
    return [image for image, _ in chosen], [label for _, label in chosen]


def augmentation_views(
    images: list[np.ndarray],
    *,
    image_size: int,
    color_jitter_strength: float,
    use_blur: bool,
    seed: int,
) -> np.ndarray:
    """float32 (N, 3, S, S, 3): per image its eval view and two pretraining views."""
    tf.random.set_seed(seed)  # the augmentations draw from the global TF RNG
    rows = []
    for image in images:
        image = tf.convert_to_tensor(image)
        views = [preprocess_for_eval(image, image_size)]
        views += [
            preprocess_for_train(
                image, image_size, color_jitter_strength=color_jitter_strength, use_blur=use_blur
            )
            for _ in range(2)
        ]
        rows.append(tf.stack(views).numpy())
    return np.stack(rows)


def tile(views: np.ndarray, scale: int, gap: int = GAP) -> np.ndarray:
    """(N, C, S, S, 3) floats -> one uint8 image of N rows and C columns of (S*scale)^2 cells."""
    num_rows, num_cols, size = views.shape[:3]
    cell = size * scale
    grid = np.full(
        (num_rows * cell + (num_rows - 1) * gap, num_cols * cell + (num_cols - 1) * gap, 3), 255, np.uint8
    )
    for r in range(num_rows):
        for c in range(num_cols):
            big = to_uint8(views[r, c]).repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour
            y, x = r * (cell + gap), c * (cell + gap)
            grid[y : y + cell, x : x + cell] = big
    return grid


def augmentation_grid(
    images: list[np.ndarray],
    *,
    image_size: int = 32,
    color_jitter_strength: float = 0.5,
    use_blur: bool = False,
    seed: int = 0,
    scale: int | None = None,
) -> np.ndarray:
    """uint8 grid: a row per image, columns as `COLUMNS`, cells `image_size * scale` px, `GAP` apart."""
    views = augmentation_views(
        images,
        image_size=image_size,
        color_jitter_strength=color_jitter_strength,
        use_blur=use_blur,
        seed=seed,
    )
    return tile(views, scale or upscale_factor(image_size))


def save_grid(
    grid: np.ndarray,
    path: str,
    *,
    row_names: list[str],
    column_names: tuple[str, ...] = COLUMNS,
    title: str = "",
) -> None:
    """Writes `grid` at one screen pixel per grid pixel, rows and columns labelled, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only this tool needs it
    from matplotlib.figure import Figure

    dpi = 100
    height, width = grid.shape[:2]
    # Margins in pixels, sized for ~7 px wide characters of the labels and title.
    left = 20 + 7 * max(len(name) for name in row_names)
    fig_w = width + left + 10
    title_lines = textwrap.wrap(title, width=max(20, fig_w // 7))
    top, bottom = 34 + 15 * len(title_lines), 6
    fig_h = height + top + bottom
    # No pyplot: no global figure state and no display needed (Agg canvas).
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    ax.imshow(grid, interpolation="nearest")
    row_pitch = (height + GAP) / len(row_names)
    col_pitch = (width + GAP) / len(column_names)
    ax.set_yticks([row_pitch * (i + 0.5) - GAP / 2 for i in range(len(row_names))], row_names)
    ax.set_xticks([col_pitch * (i + 0.5) - GAP / 2 for i in range(len(column_names))], column_names)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title_lines:
        fig.suptitle("\n".join(title_lines), y=1 - 6 / fig_h, va="top", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist5k", help="mnist5k, folder:PATH or a TFDS name")
    parser.add_argument("--data_dir", default="", help="TFDS data directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--color_jitter_strength", type=float, default=0.5)
    parser.add_argument("--use_blur", type=_bool, nargs="?", const=True, default=False)
    parser.add_argument("--seed", type=int, default=0, help="picks the examples and the augmentations")
    parser.add_argument("--output", default="augmentations.png")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.image_size < 1:
        parser.error("--num_images and --image_size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    source = get_source(args.dataset, args.data_dir or None)
    images, labels = pick_examples(source, split=args.split, num_images=args.num_images, seed=args.seed)
    grid = augmentation_grid(
        images,
        image_size=args.image_size,
        color_jitter_strength=args.color_jitter_strength,
        use_blur=args.use_blur,
        seed=args.seed,
    )
    title = (
        f"{source.name} {args.split}, {args.image_size}px, color_jitter_strength="
        f"{args.color_jitter_strength:g}, use_blur={str(args.use_blur).lower()}, seed={args.seed}"
    )
    save_grid(grid, args.output, row_names=[source.class_names[y] for y in labels], title=title)
    print(
        f"Wrote {args.output}: {len(images)} examples x {len(COLUMNS)} columns, "
        f"{grid.shape[1]}x{grid.shape[0]} px grid"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
