"""Corruptions of shifted target domains (`simclr_tf/data/corruptions.py`) and their tool."""

from __future__ import annotations

import numpy as np
import pytest

from simclr_tf.data import corruptions, get_source


def _image(seed: int = 0, size: int = 24) -> np.ndarray:
    """A smooth colour gradient plus texture: blur, contrast and JPEG all change it."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, 1 - ramp), np.full((size, size), 0.4)], axis=-1)
    return np.clip(np.rint((0.7 * base + 0.3 * rng.uniform(size=base.shape)) * 255), 0, 255).astype(np.uint8)


def test_gaussian_noise_matches_numpy_with_the_same_generator():
    image = _image()
    expected = np.clip(np.rint((image / 255.0 + np.random.default_rng(5).normal(scale=0.08, size=image.shape)) * 255), 0, 255)
    out = corruptions.corrupt(image, "gaussian_noise", 3, np.random.default_rng(5))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_gaussian_blur_matches_a_direct_2d_convolution():
    image = _image(1, size=12)
    sigma = corruptions.STRENGTHS["gaussian_blur"][4]
    kernel = corruptions.gaussian_kernel(sigma)
    radius = len(kernel) // 2
    weights = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)  # truncated at 4 sigma = 4 px
    np.testing.assert_allclose(kernel, weights / weights.sum(), rtol=1e-12)
    padded = np.pad(image / 255.0, [(radius, radius), (radius, radius), (0, 0)], mode="symmetric")
    kernel_2d = np.outer(kernel, kernel)
    expected = np.zeros(image.shape)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            window = padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1]
            expected[i, j] = (window * kernel_2d[:, :, None]).sum(axis=(0, 1))
    expected = np.clip(np.rint(expected * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(corruptions.corrupt(image, "gaussian_blur", 5, None), expected)
    flat = np.full((8, 8, 3), 77, np.uint8)  # blurring a constant image changes nothing
    np.testing.assert_array_equal(corruptions.gaussian_blur(flat, 1.0), flat)


def test_contrast_scales_deviations_from_each_channels_mean():
    image = _image(2)
    x = image / 255.0
    mean = x.mean(axis=(0, 1))
    expected = np.clip(np.rint(((x - mean) * 0.4 + mean) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(corruptions.corrupt(image, "contrast", 3, None), expected)


@pytest.mark.parametrize("corruption", corruptions.CORRUPTIONS)
def test_higher_severity_changes_the_image_more(corruption):
    image = _image(3)
    errors = [np.abs(corruptions.corrupt(image, corruption, s, np.random.default_rng(0)).astype(float) - image).mean()
              for s in corruptions.SEVERITIES]
    assert errors[0] > 0
    assert errors[-1] > errors[0] and all(b >= a - 0.05 for a, b in zip(errors, errors[1:])), errors


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="Unknown corruption 'fog'"):
        corruptions.corrupt(_image(), "fog", 1, None)
    with pytest.raises(ValueError, match="Severity 6"):
        corruptions.corrupt(_image(), "contrast", 6, None)


def test_the_tool_writes_folder_datasets_reproducibly(tmp_path):
    from tools import corrupt_images

    def run(output):
        return corrupt_images.write_corrupted(corrupt_images.parse_args([
            "--dataset=mnist5k", "--split=train[:6]", "--corruptions=gaussian_noise,contrast",
            "--severities=1,3", "--seed=4", f"--output_dir={output}"]))

    assert run(tmp_path / "a") == {f"{c}_{s}": 6 for c in ("gaussian_noise", "contrast") for s in (1, 3)}
    run(tmp_path / "b")
    clean = get_source("mnist5k")
    clean_images = [(image, label) for image, label in clean.as_dataset("train[:6]", shuffle_files=False).as_numpy_iterator()]
    for name in ("gaussian_noise_1", "gaussian_noise_3", "contrast_3"):
        target = get_source(f"folder:{tmp_path / 'a' / name}")
        assert target.class_names == clean.class_names and target.num_examples("train") == 6
        for path in sorted((tmp_path / "a" / name / "train").rglob("*.png")):
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    # Each file is its source image corrupted, under the source image's class.
    index = 2
    image, label = clean_images[index]
    path = tmp_path / "a" / "contrast_3" / "train" / clean.class_names[int(label)] / f"{index:06d}.png"
    import tensorflow as tf

    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(str(path))).numpy(),
                                  corruptions.corrupt(image, "contrast", 3, None))
    with pytest.raises(SystemExit):
        corrupt_images.parse_args(["--dataset=mnist5k", "--output_dir=x", "--severities=0"])
