"""S4L-Rotation: rotate_batch against NumPy rotations and the loss against a NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import s4l


def _log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_rotate_batch_by_hand():
    image = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)[None, :, :, None]  # (1, 2, 2, 1)
    rotated, rotation_labels = s4l.rotate_batch(tf.constant(image))
    # Counter-clockwise quarter turns: the top-right pixel moves to the top-left.
    expected = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    np.testing.assert_array_equal(rotated.numpy()[..., 0], expected)
    np.testing.assert_array_equal(rotation_labels.numpy(), [0, 1, 2, 3])


def test_rotate_batch_is_view_major_and_matches_numpy():
    images = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
    rotated, rotation_labels = s4l.rotate_batch(tf.constant(images))
    assert rotated.shape == (12, 5, 5, 2) and rotation_labels.dtype == tf.int32
    np.testing.assert_array_equal(rotation_labels.numpy(), np.repeat(np.arange(4), 3))
    for k in range(4):
        np.testing.assert_array_equal(rotated.numpy()[3 * k : 3 * (k + 1)], np.rot90(images, k, axes=(1, 2)))


def test_rotate_batch_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        s4l.rotate_batch(tf.zeros([2, 4, 6, 3]))


@pytest.mark.parametrize("rotation_weight", [0.0, 1.0, 0.5])
def test_s4l_loss_matches_numpy(rotation_weight):
    rng = np.random.default_rng(1)
    labeled = (2.0 * rng.normal(size=(8, 5))).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    rotation_logits = (2.0 * rng.normal(size=(24, 4))).astype(np.float32)
    rotation_labels = np.repeat(np.arange(4), 6)
    loss, metrics = s4l.s4l_rotation_loss(
        labeled_logits=tf.constant(labeled), labels=tf.constant(labels),
        rotation_logits=tf.constant(rotation_logits), rotation_labels=tf.constant(rotation_labels),
        rotation_weight=rotation_weight,
    )
    sup = -_log_softmax(labeled)[np.arange(8), labels].mean()
    rot = -_log_softmax(rotation_logits)[np.arange(24), rotation_labels].mean()
    np.testing.assert_allclose(loss.numpy(), sup + rotation_weight * rot, rtol=1e-5)
    np.testing.assert_allclose(metrics["rotation_loss"].numpy(), rot, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["rotation_acc"].numpy(), (rotation_logits.argmax(1) == rotation_labels).mean(), rtol=1e-6
    )
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), sup, rtol=1e-5)


def test_rotation_task_is_learnable_from_rotate_batch():
    # A rotation "head" that reads which corner holds the marked pixel solves the task:
    # labels and rotated images line up.
    images = np.zeros((2, 3, 3, 1), np.float32)
    images[:, 0, 0, 0] = 1.0  # marked top-left corner
    rotated, rotation_labels = s4l.rotate_batch(tf.constant(images))
    corners = tf.stack(
        [rotated[:, 0, 0, 0], rotated[:, 2, 0, 0], rotated[:, 2, 2, 0], rotated[:, 0, 2, 0]], axis=1
    )  # counter-clockwise turns move the top-left corner down the left side first
    _, metrics = s4l.s4l_rotation_loss(
        labeled_logits=tf.zeros([1, 2]), labels=tf.constant([0]),
        rotation_logits=10.0 * corners, rotation_labels=rotation_labels,
    )
    assert metrics["rotation_acc"].numpy() == 1.0
