"""uda_loss against a NumPy reference of UDA's objective (TSA, sharpening, confidence mask)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import uda


def _log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _tsa_reference(schedule, progress, num_classes):
    # The UDA paper's schedules: alpha_t from 0 to 1, eta_t = alpha_t (1 - 1/K) + 1/K.
    alpha = {
        "none": None,
        "linear": progress,
        "exp": np.exp(5.0 * (progress - 1.0)),
        "log": 1.0 - np.exp(-5.0 * progress),
    }[schedule]
    if alpha is None:
        return 1.0
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def _reference(labeled, labels, weak, strong, progress, temperature, confidence, tsa, weight):
    n, c = labeled.shape
    log_p_lab = _log_softmax(labeled)
    ce = -log_p_lab[np.arange(n), labels]
    eta = _tsa_reference(tsa, progress, c)
    # A labeled row is trained only while its true-class probability is <= eta.
    trained = np.exp(log_p_lab[np.arange(n), labels]) <= eta
    sup = (ce * trained).sum() / max(trained.sum(), 1)
    log_target = _log_softmax(weak / temperature)
    kl = (np.exp(log_target) * (log_target - _log_softmax(strong))).sum(axis=1)
    mask = np.exp(_log_softmax(weak)).max(axis=1) > confidence
    unsup = (kl * mask).mean()
    return sup + weight * unsup, sup, unsup, mask, trained, eta


def _batch(seed, b=10, u=12, c=6):
    rng = np.random.default_rng(seed)
    labeled = (2.5 * rng.normal(size=(b, c))).astype(np.float32)
    # Half the labels agree with the logits, so TSA has confident rows to drop.
    labels = np.where(np.arange(b) < b // 2, labeled.argmax(axis=1), rng.integers(0, c, size=b))
    weak = (2.5 * rng.normal(size=(u, c))).astype(np.float32)
    strong = (weak + 1.5 * rng.normal(size=(u, c))).astype(np.float32)
    return labeled, labels, weak, strong, rng.integers(0, c, size=u)


def _call(labeled, labels, weak, strong, **kwargs):
    return uda.uda_loss(
        labeled_logits=tf.constant(labeled),
        labels=tf.constant(labels),
        weak_logits=tf.constant(weak),
        strong_logits=tf.constant(strong),
        **kwargs,
    )


@pytest.mark.parametrize("tsa", ["none", "linear", "log", "exp"])
@pytest.mark.parametrize("progress", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_uda_matches_numpy_for_every_tsa_schedule(tsa, progress):
    labeled, labels, weak, strong, _ = _batch(0)
    loss, metrics = _call(
        labeled, labels, weak, strong, progress=tf.constant(progress), temperature=0.4,
        confidence=0.6, tsa=tsa, unlabeled_weight=2.0,
    )
    ref, sup, unsup, mask, trained, eta = _reference(
        labeled, labels, weak, strong, progress, 0.4, 0.6, tsa, 2.0
    )
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), unsup, rtol=1e-5)
    np.testing.assert_allclose(metrics["tsa_threshold"].numpy(), eta, rtol=1e-5)
    np.testing.assert_allclose(metrics["tsa_trained_ratio"].numpy(), trained.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    assert 0 < mask.sum() < len(mask)


def test_tsa_schedules_masks_some_rows_mid_training():
    # The fixture really exercises the TSA mask: some labeled rows are dropped, not all.
    labeled, labels, weak, strong, _ = _batch(0)
    for tsa, progress in [("linear", 0.5), ("log", 0.15), ("exp", 0.9)]:
        *_, trained, _ = _reference(labeled, labels, weak, strong, progress, 0.4, 0.6, tsa, 1.0)
        assert 0 < trained.sum() < len(trained), tsa


def test_tsa_threshold_end_points():
    for tsa in ["linear", "log", "exp"]:
        np.testing.assert_allclose(uda.tsa_threshold(0.0, schedule=tsa, num_classes=10).numpy(),
                                   _tsa_reference(tsa, 0.0, 10), rtol=1e-6)
    np.testing.assert_allclose(uda.tsa_threshold(0.0, schedule="linear", num_classes=10).numpy(), 0.1, rtol=1e-6)
    np.testing.assert_allclose(uda.tsa_threshold(1.0, schedule="exp", num_classes=10).numpy(), 1.0, rtol=1e-6)
    assert uda.tsa_threshold(0.3, schedule="none", num_classes=10).numpy() == 1.0


def test_tsa_all_rows_masked_gives_zero_not_nan():
    # Confident and correct labeled logits: at progress 0 (threshold 1/C) all are dropped.
    labeled = np.full((4, 5), -3.0, np.float32)
    labels = np.array([0, 1, 2, 3])
    labeled[np.arange(4), labels] = 3.0
    _, _, weak, strong, _ = _batch(1, c=5)
    loss, metrics = _call(labeled, labels, weak, strong, progress=0.0, tsa="linear", confidence=0.99)
    assert metrics["supervised_loss"].numpy() == 0.0
    assert metrics["tsa_trained_ratio"].numpy() == 0.0
    assert np.isfinite(loss.numpy())


@pytest.mark.parametrize("temperature", [0.4, 1.0])
@pytest.mark.parametrize("confidence", [0.0, 0.5, 0.8])
def test_uda_sharpening_and_confidence(temperature, confidence):
    labeled, labels, weak, strong, _ = _batch(2)
    _, metrics = _call(labeled, labels, weak, strong, progress=0.5, temperature=temperature,
                       confidence=confidence)
    _, _, unsup, mask, _, _ = _reference(labeled, labels, weak, strong, 0.5, temperature, confidence, "none", 1.0)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), unsup, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    if confidence == 0.0:
        assert mask.all()


def test_uda_confidence_mask_is_strict():
    # Weak row 0 has max probability exactly 0.5 = confidence: UDA's `>` drops it.
    weak = np.array([[0.0, 0.0], [3.0, -3.0]], np.float32)
    strong = np.array([[1.0, -1.0], [0.0, 1.0]], np.float32)
    _, metrics = _call(np.zeros((1, 2), np.float32), np.array([0]), weak, strong,
                       progress=0.0, confidence=0.5)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), 0.5)


def test_uda_gradient_skips_weak_view():
    labeled, labels, weak, strong, _ = _batch(3)
    weak_var, strong_var = tf.Variable(weak), tf.Variable(strong)
    with tf.GradientTape() as tape:
        loss, _ = uda.uda_loss(labeled_logits=labeled, labels=labels, weak_logits=weak_var,
                               strong_logits=strong_var, progress=0.5, confidence=0.0)
    grad_weak, grad_strong = tape.gradient(loss, [weak_var, strong_var])
    assert grad_weak is None
    # d KL(p || softmax(q)) / dq = softmax(q) - p, averaged over U rows.
    p = np.exp(_log_softmax(weak / 0.4))
    expected = (np.exp(_log_softmax(strong)) - p) / len(weak)
    np.testing.assert_allclose(grad_strong.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_uda_rejects_unknown_schedule_and_temperature():
    labeled, labels, weak, strong, _ = _batch(4)
    with pytest.raises(ValueError, match="tsa"):
        _call(labeled, labels, weak, strong, progress=0.1, tsa="linear_schedule")
    with pytest.raises(ValueError, match="temperature"):
        _call(labeled, labels, weak, strong, progress=0.1, temperature=0.0)
