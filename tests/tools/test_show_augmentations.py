"""tools/show_augmentations.py: grid layout, eval column, views, PNG output, the script."""

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import get_source, preprocess_for_eval

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "show_augmentations.py"
SIZE = 28  # mnist5k's own size


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("show_augmentations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist_examples(tool):
    source = get_source("mnist5k")
    images, labels = tool.pick_examples(source, split="train", num_images=5, seed=1)
    return source, images, labels


def _cells(tool, grid, num_rows, image_size):
    """The grid cut back into (rows, 3, S, S, 3) uint8 images at their original size."""
    scale = tool.upscale_factor(image_size)
    cell = image_size * scale
    pitch = cell + tool.GAP
    rows = [
        np.stack([grid[r * pitch: r * pitch + cell, c * pitch: c * pitch + cell] for c in range(3)])
        for r in range(num_rows)
    ]
    return np.stack(rows), scale


def test_pick_examples_prefers_distinct_classes(tool, mnist_examples):
    source, images, labels = mnist_examples
    assert len(images) == 5
    assert all(image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 for image in images)
    assert len(set(labels)) == 5 and labels == sorted(labels)
    again = tool.pick_examples(source, split="train", num_images=5, seed=1)
    assert again[1] == labels and all(np.array_equal(a, b) for a, b in zip(again[0], images))
    assert tool.pick_examples(source, split="train", num_images=5, seed=2)[1] != labels  # seed picks others


def test_grid_layout_eval_column_and_views(tool, mnist_examples):
    _, images, _ = mnist_examples
    grid = tool.augmentation_grid(images, image_size=SIZE, color_jitter_strength=1.0, use_blur=True, seed=0)
    scale = tool.upscale_factor(SIZE)
    assert scale == 4  # 28 px shown at 112 px
    cell = SIZE * scale
    assert grid.dtype == np.uint8
    assert grid.shape == (5 * cell + 4 * tool.GAP, 3 * cell + 2 * tool.GAP, 3)
    assert (grid[cell: cell + tool.GAP] == 255).all()  # white gap between rows
    cells, _ = _cells(tool, grid, 5, SIZE)
    # Nearest-neighbour upscaling: every scale x scale block is one pixel.
    blocks = cells.reshape(5, 3, SIZE, scale, SIZE, scale, 3)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()
    small = cells[:, :, ::scale, ::scale]  # (rows, 3, S, S, 3)
    for row, image in enumerate(images):
        want = tool.to_uint8(preprocess_for_eval(tf.constant(image), SIZE).numpy())
        np.testing.assert_array_equal(small[row, 0], want)
        assert not np.array_equal(small[row, 1], small[row, 2])  # two independent views
        assert not np.array_equal(small[row, 1], small[row, 0])
    # The seed fixes the views.
    again = tool.augmentation_grid(images, image_size=SIZE, color_jitter_strength=1.0, use_blur=True, seed=0)
    np.testing.assert_array_equal(again, grid)


def test_grid_for_other_sizes(tool, mnist_examples):
    _, images, _ = mnist_examples
    grid = tool.augmentation_grid(images[:2], image_size=64, color_jitter_strength=0.0, seed=0)
    assert grid.shape == (2 * 128 + tool.GAP, 3 * 128 + 2 * tool.GAP, 3)  # 64 px upscaled 2x


def test_save_grid_writes_a_png(tool, mnist_examples, tmp_path):
    source, images, labels = mnist_examples
    grid = tool.augmentation_grid(images, image_size=SIZE, seed=0)
    path = tmp_path / "out" / "grid.png"
    tool.save_grid(grid, str(path), row_names=[source.class_names[y] for y in labels], title="mnist5k test")
    with Image.open(path) as png:
        assert png.format == "PNG"
        written = np.asarray(png.convert("RGB"))
    # At least the grid's size plus margins for the labels.
    assert written.shape[0] > grid.shape[0] and written.shape[1] > grid.shape[1]
    # The grid is drawn one pixel per pixel: its top-left cell appears verbatim.
    assert _contains(written, grid[: SIZE * 4, : SIZE * 4])


def _contains(haystack, needle):
    height, width = needle.shape[:2]
    for y, x in np.argwhere((haystack == needle[0, 0]).all(-1)):
        if np.array_equal(haystack[y: y + height, x: x + width], needle):
            return True
    return False


def test_script_runs(tmp_path):
    output = tmp_path / "aug.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset=mnist5k", "--num_images=2", "--image_size=28",
         "--use_blur=false", f"--output={output}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Wrote" in result.stdout
    with Image.open(output) as png:
        assert png.size[0] > 3 * 112 and png.size[1] > 2 * 112
