"""simclr_tf.methods.common against NumPy references written from the definitions."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import common


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _logits(seed, n=12, c=5, scale=3.0):
    return (scale * np.random.default_rng(seed).normal(size=(n, c))).astype(np.float32)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("inclusive", [True, False])
def test_pseudo_labels_match_numpy(threshold, inclusive):
    logits = _logits(0)
    labels, mask, probs = common.pseudo_labels(tf.constant(logits), threshold=threshold, inclusive=inclusive)
    p = _softmax(logits.astype(np.float64))
    confidence = p.max(axis=1)
    expected_mask = (confidence >= threshold) if inclusive else (confidence > threshold)
    np.testing.assert_array_equal(labels.numpy(), p.argmax(axis=1))
    np.testing.assert_array_equal(mask.numpy(), expected_mask.astype(np.float32))
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-5, atol=1e-7)
    assert labels.dtype == tf.int32 and mask.dtype == tf.float32 and probs.dtype == tf.float32
    if threshold == 0.8:  # The fixture keeps some rows and drops others.
        assert 0 < expected_mask.sum() < len(expected_mask)


def test_pseudo_labels_threshold_boundary():
    # Two equal logits: max probability exactly 0.5 (exact in float32).
    logits = tf.constant([[0.0, 0.0], [2.0, -2.0]])
    _, kept_inclusive, _ = common.pseudo_labels(logits, threshold=0.5, inclusive=True)
    _, kept_strict, _ = common.pseudo_labels(logits, threshold=0.5, inclusive=False)
    np.testing.assert_array_equal(kept_inclusive.numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(kept_strict.numpy(), [0.0, 1.0])


def test_pseudo_labels_pass_no_gradient():
    logits = tf.Variable(_logits(1))
    with tf.GradientTape() as tape:
        _, _, probs = common.pseudo_labels(logits, threshold=0.5)
        total = tf.reduce_sum(probs * tf.range(5, dtype=tf.float32))
    assert tape.gradient(total, logits) is None


def test_pseudo_labels_accept_half_precision():
    logits = _logits(2)
    labels, mask, probs = common.pseudo_labels(tf.constant(logits, tf.float16), threshold=0.7)
    ref_labels, ref_mask, ref_probs = common.pseudo_labels(tf.constant(logits), threshold=0.7)
    assert probs.dtype == tf.float32
    np.testing.assert_array_equal(labels.numpy(), ref_labels.numpy())
    np.testing.assert_allclose(probs.numpy(), ref_probs.numpy(), atol=2e-3)


@pytest.mark.parametrize("temperature", [0.25, 0.4, 1.0, 2.0])
def test_sharpen_matches_mixmatch_power_form(temperature):
    # MixMatch's definition: p**(1/T) renormalised, with p = softmax(logits).
    logits = _logits(3)
    p = _softmax(logits.astype(np.float64))
    expected = p ** (1.0 / temperature)
    expected /= expected.sum(axis=1, keepdims=True)
    sharpened = common.sharpen(tf.constant(logits), temperature=temperature)
    np.testing.assert_allclose(sharpened.numpy(), expected, rtol=1e-5, atol=1e-7)
    if temperature < 1.0:  # Sharper: the top class gains probability.
        assert np.all(sharpened.numpy().max(axis=1) >= p.max(axis=1) - 1e-6)


def test_sharpen_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        common.sharpen(tf.zeros([2, 3]), temperature=0.0)


def test_sharpen_passes_no_gradient():
    logits = tf.Variable(_logits(4))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(common.sharpen(logits, temperature=0.5)[:, 0])
    assert tape.gradient(total, logits) is None


@pytest.mark.parametrize("soft", [False, True])
def test_masked_cross_entropy_averages_over_all_rows(soft):
    rng = np.random.default_rng(5)
    logits = _logits(5, n=8)
    targets = rng.integers(0, 5, size=8)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    log_p = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    if soft:
        target_dist = _softmax(rng.normal(size=(8, 5)))
        per_row = -(target_dist * log_p).sum(axis=1)
        tf_targets = tf.constant(target_dist, tf.float32)
    else:
        per_row = -log_p[np.arange(8), targets]
        tf_targets = tf.constant(targets)
    expected = (per_row * mask).sum() / 8  # Masked rows stay in the denominator.
    loss = common.masked_cross_entropy(logits=tf.constant(logits), targets=tf_targets, mask=tf.constant(mask))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("rampup_fraction", [0.0, 0.25, 1.0])
def test_sigmoid_rampup_matches_numpy(rampup_fraction):
    for progress in [0.0, 0.05, 0.125, 0.25, 0.6, 1.0, 1.5]:
        if rampup_fraction == 0:
            expected = 1.0
        else:
            t = min(max(progress / rampup_fraction, 0.0), 1.0)
            expected = np.exp(-5.0 * (1.0 - t) ** 2)
        value = common.sigmoid_rampup(tf.constant(progress), rampup_fraction=rampup_fraction)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6)
        assert value.dtype == tf.float32 and value.shape == ()
    # Starts at exp(-5), not 0, as Laine & Aila's ramp.
    np.testing.assert_allclose(common.sigmoid_rampup(0.0, rampup_fraction=0.5).numpy(), np.exp(-5.0), rtol=1e-6)


def test_pseudo_label_metrics():
    pseudo = tf.constant([0, 1, 2, 3, 1, 0], tf.int32)
    mask = tf.constant([1, 1, 0, 1, 0, 1], tf.float32)
    true = tf.constant([0, 2, 2, 3, 1, 1], tf.int32)
    metrics = common.pseudo_label_metrics(pseudo, mask, true)
    # Kept rows 0, 1, 3, 5: hits on 0 and 3; rows 2 and 4 are hits but not kept.
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), 4 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["pseudo_label_acc"].numpy(), 2 / 4, rtol=1e-6)
    assert set(common.pseudo_label_metrics(pseudo, mask)) == {"mask_rate"}


def test_pseudo_label_metrics_nothing_kept_is_zero_not_nan():
    metrics = common.pseudo_label_metrics(tf.constant([1, 2]), tf.zeros([2]), tf.constant([1, 2]))
    assert metrics["mask_rate"].numpy() == 0.0
    assert metrics["pseudo_label_acc"].numpy() == 0.0


def test_pseudo_label_class_fractions():
    rng = np.random.default_rng(6)
    pseudo = rng.integers(0, 4, size=20)
    mask = (rng.random(20) < 0.6).astype(np.float32)
    expected = np.bincount(pseudo[mask > 0], minlength=4) / mask.sum()
    fractions = common.pseudo_label_class_fractions(tf.constant(pseudo), tf.constant(mask), 4)
    np.testing.assert_allclose(fractions.numpy(), expected, rtol=1e-6)
    assert fractions.shape == (4,) and fractions.dtype == tf.float32
    empty = common.pseudo_label_class_fractions(tf.constant(pseudo), tf.zeros([20]), 4)
    np.testing.assert_array_equal(empty.numpy(), np.zeros(4))
