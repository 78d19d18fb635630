"""Image folders with bad files, odd formats and sizes, empty classes, missing splits."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.config import Config, FlagError
from simclr_tf.data import build_dataset, get_source
from simclr_tf.train.experiment import Experiment


def _png_bytes(size=(12, 9), colour=(10, 20, 30)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _jpeg_bytes(size=(40, 40)):
    out = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(out, "JPEG")
    return out.getvalue()


BAD_FILES = {
    "text.jpg": b"<html>404 Not Found</html>",
    "empty.png": b"",
    "truncated.jpg": _jpeg_bytes()[:200],
    "truncated.png": _png_bytes((64, 64))[:60],
}


def _folder(root, bad_name=None):
    """Two classes of 3 good PNGs each, plus one bad file in class 'b'."""
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / "train" / cls / f"{i}.png").write_bytes(_png_bytes(colour=(i, i, i)))
    if bad_name:
        (root / "train" / "b" / bad_name).write_bytes(BAD_FILES[bad_name])
    return root


def _read_all(source, split="train"):
    return list(source.as_dataset(split, shuffle_files=False).as_numpy_iterator())


@pytest.mark.parametrize("bad_name", sorted(BAD_FILES))
def test_an_unreadable_file_stops_reading_with_its_name(tmp_path, bad_name):
    source = get_source(f"folder:{_folder(tmp_path, bad_name)}")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _read_all(source)
    message = error.value.message
    assert str(tmp_path / "train" / "b" / bad_name) in message
    assert "Cannot decode image file" in message and "--skip_bad_images" in message


def test_the_training_pipeline_names_the_bad_file_too(tmp_path):
    source = get_source(f"folder:{_folder(tmp_path, 'text.jpg')}")
    ds = build_dataset(source, split="train", batch_size=7, is_training=True, num_views=2, image_size=8,
                       color_jitter_strength=0.5, use_blur=False, cache=True, shuffle_seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="text.jpg"):
        next(iter(ds))


def test_skip_bad_images_drops_and_counts_them(tmp_path, capfd):
    root = _folder(tmp_path, "text.jpg")
    (root / "train" / "a" / "zero.png").write_bytes(b"")
    source = get_source(f"folder:{root}", skip_bad_images=True)
    examples = _read_all(source)
    assert [int(label) for _, label in examples] == [0, 0, 0, 1, 1, 1]
    assert all(image.shape == (9, 12, 3) for image, _ in examples)
    err = capfd.readouterr().err
    assert "skipped unreadable image file" in err
    assert f"skipped unreadable image file {root / 'train' / 'a' / 'zero.png'} (1 skipped so far" in err
    assert f"skipped unreadable image file {root / 'train' / 'b' / 'text.jpg'} (2 skipped so far" in err


def test_skipping_every_file_fails_instead_of_spinning(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "train" / "a" / f"{i}.jpg").write_bytes(b"nope")
    source = get_source(f"folder:{tmp_path}", skip_bad_images=True)
    ds = build_dataset(source, split="train", batch_size=1, is_training=True, num_views=1, image_size=8,
                       color_jitter_strength=0.0, use_blur=False, shuffle_seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="All 2 image files are unreadable"):
        next(iter(ds))


# (file name, PIL mode, (width, height), save options)
ODD_IMAGES = [
    ("gray.jpg", "L", (20, 15), {}),
    ("cmyk.jpg", "CMYK", (16, 16), {}),
    ("progressive.jpg", "RGB", (33, 17), {"progressive": True}),
    ("rgba.png", "RGBA", (10, 10), {}),
    ("gray_alpha.png", "LA", (9, 11), {}),
    ("palette.png", "P", (13, 7), {}),
    ("sixteen_bit.png", "I;16", (8, 8), {}),
    ("pixel.png", "RGB", (1, 1), {}),
    ("tall.png", "RGB", (1, 300), {}),
    ("wide.bmp", "RGB", (500, 2), {}),
    ("big.gif", "RGB", (640, 480), {}),
]


def test_odd_formats_and_sizes_and_empty_classes_train_and_evaluate(tmp_path):
    for i, (name, mode, size, options) in enumerate(ODD_IMAGES):
        for split in ("train", "validation"):
            path = tmp_path / split / f"class{i % 3}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = 100 if mode in ("L", "P", "I;16") else (100,) * len(mode)
            Image.new(mode, size, colour).save(path, **options)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "train" / "class0" / "README.txt").write_text("ignored")
    source = get_source(f"folder:{tmp_path}")
    assert source.class_names == ["class0", "class1", "class2", "empty_class"]
    assert source.num_examples("train") == len(ODD_IMAGES)
    train = build_dataset(source, split="train", batch_size=4, is_training=True, num_views=2, image_size=16,
                          color_jitter_strength=1.0, use_blur=True, shuffle_seed=0)
    for batch in train.take(4):
        image = batch["image"].numpy()
        assert image.shape == (8, 16, 16, 3) and np.isfinite(image).all()
        assert image.min() >= 0 and image.max() <= 1
    evaluation = build_dataset(source, split="validation", batch_size=4, is_training=False, num_views=1,
                               image_size=64, color_jitter_strength=0.0, use_blur=False)
    images = np.concatenate([b["image"].numpy() for b in evaluation])
    assert images.shape == (len(ODD_IMAGES), 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_files_without_an_image_extension_are_ignored_and_logged(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "train" / "a" / "labels.csv").write_text("x")
    (root / "train" / "b" / "scan.tiff").write_bytes(b"II*\x00")
    with caplog.at_level("WARNING", logger="absl"):
        assert get_source(f"folder:{root}").num_examples("train") == 6
    assert f"Ignoring 2 file(s) under {root / 'train'}" in caplog.text


def test_a_missing_split_is_a_flag_error_naming_the_path(tmp_path):
    root = _folder(tmp_path)
    config = Config.demo().replace(
        data={"dataset": f"folder:{root}", "eval_split": "validation"},
        train={"train_steps": 1},
    )
    with pytest.raises(FlagError) as error:
        Experiment.create(config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith("--eval_split: ")
    assert f"{root / 'validation'}" in message and "expected" in message and "<class>/<images>" in message
