"""mean_teacher_loss against a NumPy reference of the Mean Teacher objective."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods.mean_teacher import mean_teacher_loss


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(labeled, labels, student, teacher, progress, weight, rampup_fraction):
    sup = -np.log(_softmax(labeled)[np.arange(len(labels)), labels]).mean()
    n, c = student.shape
    # The paper's code: squared error summed over everything, / classes, / batch size.
    consistency = ((_softmax(student) - _softmax(teacher)) ** 2).sum() / c / n
    if rampup_fraction == 0:
        ramp = 1.0
    else:
        phase = 1.0 - np.clip(progress / rampup_fraction, 0.0, 1.0)
        ramp = np.exp(-5.0 * phase**2)
    return sup + weight * ramp * consistency, sup, consistency, weight * ramp


def _batch(seed, b=6, u=10, c=5):
    rng = np.random.default_rng(seed)
    labeled = (2.0 * rng.normal(size=(b, c))).astype(np.float32)
    labels = rng.integers(0, c, size=b)
    teacher = (2.0 * rng.normal(size=(u, c))).astype(np.float32)
    student = (teacher + rng.normal(size=(u, c))).astype(np.float32)
    return labeled, labels, student, teacher, rng.integers(0, c, size=u)


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.2, 0.4, 0.9])
@pytest.mark.parametrize("rampup_fraction", [0.0, 0.4])
def test_mean_teacher_matches_numpy(progress, rampup_fraction):
    labeled, labels, student, teacher, true_u = _batch(0)
    loss, metrics = mean_teacher_loss(
        labeled_logits=tf.constant(labeled),
        labels=tf.constant(labels),
        student_logits=tf.constant(student),
        teacher_logits=tf.constant(teacher),
        progress=tf.constant(progress),
        weight=50.0,
        rampup_fraction=rampup_fraction,
        unlabeled_labels=tf.constant(true_u),
    )
    ref, sup, consistency, ramped = _reference(labeled, labels, student, teacher, progress, 50.0, rampup_fraction)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), consistency, rtol=1e-5)
    np.testing.assert_allclose(metrics["consistency_weight"].numpy(), ramped, rtol=1e-5)
    np.testing.assert_allclose(metrics["teacher_acc"].numpy(), (teacher.argmax(1) == true_u).mean(), rtol=1e-6)


def test_mean_teacher_gradient_skips_teacher():
    labeled, labels, student, teacher, _ = _batch(1)
    student_var, teacher_var = tf.Variable(student), tf.Variable(teacher)
    with tf.GradientTape() as tape:
        loss, _ = mean_teacher_loss(
            labeled_logits=labeled, labels=labels, student_logits=student_var,
            teacher_logits=teacher_var, progress=1.0, weight=1.0, rampup_fraction=0.0,
        )
    grad_student, grad_teacher = tape.gradient(loss, [student_var, teacher_var])
    assert grad_teacher is None
    # d/ds of mean_{n,c} (p_s - p_t)^2 = J_softmax^T 2 (p_s - p_t) / (N C).
    n, c = student.shape
    p_s, p_t = _softmax(student), _softmax(teacher)
    g = 2.0 * (p_s - p_t) / (n * c)
    expected = p_s * (g - (g * p_s).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(grad_student.numpy(), expected, rtol=1e-4, atol=1e-8)
