"""fixmatch_loss against a NumPy reference of FixMatch's objective."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods.fixmatch import fixmatch_loss


def _log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference(labeled, labels, weak, strong, threshold, weight):
    sup = -_log_softmax(labeled)[np.arange(len(labels)), labels].mean()
    p = np.exp(_log_softmax(weak))
    targets = p.argmax(axis=1)
    mask = (p.max(axis=1) >= threshold).astype(np.float64)
    unsup = (-_log_softmax(strong)[np.arange(len(targets)), targets] * mask).mean()
    return sup + weight * unsup, sup, unsup, mask, targets


def _batch(seed, b=6, u=14, c=5):
    rng = np.random.default_rng(seed)
    labeled = (2.0 * rng.normal(size=(b, c))).astype(np.float32)
    labels = rng.integers(0, c, size=b)
    weak = (3.0 * rng.normal(size=(u, c))).astype(np.float32)
    strong = (weak + 2.0 * rng.normal(size=(u, c))).astype(np.float32)
    unlabeled_labels = rng.integers(0, c, size=u)
    return labeled, labels, weak, strong, unlabeled_labels


@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_fixmatch_matches_numpy(threshold, weight):
    labeled, labels, weak, strong, true_u = _batch(0)
    loss, metrics = fixmatch_loss(
        labeled_logits=tf.constant(labeled),
        labels=tf.constant(labels),
        weak_logits=tf.constant(weak),
        strong_logits=tf.constant(strong),
        threshold=threshold,
        unlabeled_weight=weight,
        unlabeled_labels=tf.constant(true_u),
    )
    ref, sup, unsup, mask, targets = _reference(labeled, labels, weak, strong, threshold, weight)
    if threshold in (0.6, 0.9):  # The fixture exercises the mask both ways.
        assert 0 < mask.sum() < len(mask)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), unsup, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    kept = mask > 0
    expected_acc = (targets[kept] == true_u[kept]).mean() if kept.any() else 0.0
    np.testing.assert_allclose(metrics["pseudo_label_acc"].numpy(), expected_acc, rtol=1e-6)
    acc = (labeled.argmax(axis=1) == labels).mean()
    np.testing.assert_allclose(metrics["supervised_acc"].numpy(), acc, rtol=1e-6)
    assert loss.dtype == tf.float32 and loss.shape == ()


def test_fixmatch_one_hot_labels_equal_ids():
    labeled, labels, weak, strong, _ = _batch(1)
    args = dict(labeled_logits=labeled, weak_logits=weak, strong_logits=strong, threshold=0.7)
    by_id, _ = fixmatch_loss(labels=tf.constant(labels), **args)
    by_one_hot, _ = fixmatch_loss(labels=tf.one_hot(labels, 5), **args)
    np.testing.assert_allclose(by_id.numpy(), by_one_hot.numpy(), rtol=1e-6)


def test_fixmatch_gradient_reaches_strong_view_only():
    labeled, labels, weak, strong, _ = _batch(2)
    weak_var, strong_var = tf.Variable(weak), tf.Variable(strong)
    with tf.GradientTape() as tape:
        loss, metrics = fixmatch_loss(
            labeled_logits=labeled, labels=labels, weak_logits=weak_var, strong_logits=strong_var,
            threshold=0.7,
        )
    grad_weak, grad_strong = tape.gradient(loss, [weak_var, strong_var])
    assert grad_weak is None
    # d/d strong of mean(mask * CE): (softmax(strong) - onehot(target)) * mask / U.
    p = np.exp(_log_softmax(weak))
    mask = (p.max(axis=1) >= 0.7)[:, None]
    expected = (np.exp(_log_softmax(strong)) - np.eye(5)[p.argmax(axis=1)]) * mask / len(weak)
    np.testing.assert_allclose(grad_strong.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert 0 < metrics["mask_rate"].numpy() < 1
