"""debiasmatch_loss against a NumPy reference of DebiasPL's step (debiasing, margin, running mean)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import debiasmatch
from simclr_tf.methods.fixmatch import fixmatch_loss


def _log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference(labeled, labels, weak, strong, q, momentum, tau, margin, threshold, weight):
    sup = -_log_softmax(labeled)[np.arange(len(labels)), labels].mean()
    # Pseudo-labels from the debiased weak logits, with q before this batch.
    debiased = np.exp(_log_softmax(weak - tau * np.log(q)))
    targets = debiased.argmax(axis=1)
    mask = debiased.max(axis=1) >= threshold
    # Then q moves towards this batch's mean (plain) prediction...
    q_new = momentum * q + (1.0 - momentum) * np.exp(_log_softmax(weak)).mean(axis=0)
    # ...and the strong logits get the margin tau * log q_new.
    log_p = _log_softmax(strong + margin * np.log(q_new))
    unsup = (-log_p[np.arange(len(targets)), targets] * mask).mean()
    return sup + weight * unsup, unsup, mask, targets, q_new


def _batch(seed, b=6, u=16, c=5):
    rng = np.random.default_rng(seed)
    labeled = (2.0 * rng.normal(size=(b, c))).astype(np.float32)
    labels = rng.integers(0, c, size=b)
    # A bias towards class 0, as the pseudo-labeler DebiasPL corrects.
    weak = (2.5 * rng.normal(size=(u, c)) + np.array([1.5, 0, 0, 0, 0])).astype(np.float32)
    strong = (weak + 1.5 * rng.normal(size=(u, c))).astype(np.float32)
    q = rng.dirichlet(np.ones(c)).astype(np.float32)
    return labeled, labels, weak, strong, q, rng.integers(0, c, size=u)


def _call(labeled, labels, weak, strong, q, **kwargs):
    return debiasmatch.debiasmatch_loss(
        labeled_logits=tf.constant(labeled),
        labels=tf.constant(labels),
        weak_logits=tf.constant(weak),
        strong_logits=tf.constant(strong),
        running_mean=tf.constant(q),
        **kwargs,
    )


@pytest.mark.parametrize("tau,margin", [(0.4, 0.4), (1.0, 0.3), (0.2, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("threshold", [0.5, 0.8])
# momentum 0: q_new is this batch's mean, far from q, so using one for the other shows.
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_debiasmatch_matches_numpy(tau, margin, threshold, momentum):
    labeled, labels, weak, strong, q, true_u = _batch(0)
    loss, metrics, q_new = _call(
        labeled, labels, weak, strong, q, momentum=momentum, debias_strength=tau,
        margin_strength=margin, threshold=threshold, unlabeled_weight=3.0,
        unlabeled_labels=tf.constant(true_u),
    )
    ref, unsup, mask, targets, ref_q = _reference(
        labeled, labels, weak, strong, q.astype(np.float64), momentum, tau, margin, threshold, 3.0
    )
    assert 0 < mask.sum() < len(mask)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), unsup, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["pseudo_label_acc"].numpy(), (targets[mask] == true_u[mask]).mean(), rtol=1e-6
    )
    np.testing.assert_allclose(q_new.numpy(), ref_q, rtol=1e-5)
    assert q_new.shape == (5,) and q_new.dtype == tf.float32


def test_running_mean_threads_through_steps():
    q = debiasmatch.initial_running_mean(5)
    np.testing.assert_allclose(q.numpy(), np.full(5, 0.2), rtol=1e-7)
    ref_q = np.full(5, 0.2)
    for step in range(3):
        labeled, labels, weak, strong, _, _ = _batch(10 + step)
        loss, _, q = _call(labeled, labels, weak, strong, q.numpy(), momentum=0.7, threshold=0.6)
        ref, _, _, _, ref_q = _reference(labeled, labels, weak, strong, ref_q, 0.7, 0.4, 0.4, 0.6, 10.0)
        np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
        np.testing.assert_allclose(q.numpy(), ref_q, rtol=1e-5)
    np.testing.assert_allclose(q.numpy().sum(), 1.0, rtol=1e-5)  # Still a distribution.


def test_debiasing_lowers_the_over_predicted_class():
    # q says class 0 is predicted far too often; weak logits favour it only slightly.
    weak = np.array([[1.0, 0.5, 0.0]], np.float32)
    q = np.array([0.9, 0.05, 0.05], np.float32)
    labeled, labels = np.zeros((1, 3), np.float32), np.array([0])
    _, plain, _ = _call(labeled, labels, weak, weak, q, debias_strength=0.0, threshold=0.0,
                        unlabeled_labels=tf.constant([0]))
    _, debiased, _ = _call(labeled, labels, weak, weak, q, debias_strength=0.4, threshold=0.0,
                           unlabeled_labels=tf.constant([0]))
    assert plain["pseudo_label_acc"].numpy() == 1.0  # argmax 0 without debiasing
    assert debiased["pseudo_label_acc"].numpy() == 0.0  # argmax 1 after subtracting tau log q


def test_no_debiasing_no_margin_is_fixmatch():
    labeled, labels, weak, strong, q, _ = _batch(1)
    loss, _, _ = _call(labeled, labels, weak, strong, q, debias_strength=0.0, margin_strength=0.0,
                       threshold=0.7, unlabeled_weight=2.0)
    reference, _ = fixmatch_loss(labeled_logits=labeled, labels=labels, weak_logits=weak,
                                 strong_logits=strong, threshold=0.7, unlabeled_weight=2.0)
    np.testing.assert_allclose(loss.numpy(), reference.numpy(), rtol=1e-6)


def test_gradient_reaches_strong_view_only():
    labeled, labels, weak, strong, q, _ = _batch(2)
    weak_var, strong_var, q_var = tf.Variable(weak), tf.Variable(strong), tf.Variable(q)
    with tf.GradientTape() as tape:
        loss, _, new_q = debiasmatch.debiasmatch_loss(
            labeled_logits=labeled, labels=labels, weak_logits=weak_var, strong_logits=strong_var,
            running_mean=q_var, threshold=0.5,
        )
        total = loss + tf.reduce_sum(new_q)
    grad_weak, grad_strong, grad_q = tape.gradient(total, [weak_var, strong_var, q_var])
    assert grad_weak is None and grad_q is None
    assert np.abs(grad_strong.numpy()).sum() > 0


def test_running_mean_is_averaged_over_replicas(two_cpu_strategy):
    labeled, labels, weak, strong, q, _ = _batch(3)
    other_weak = -weak  # Replica 1 sees a very different batch.
    weak_by_replica = tf.constant(np.stack([weak, other_weak]))

    @tf.function
    def step():
        context = tf.distribute.get_replica_context()
        replica_weak = tf.gather(weak_by_replica, context.replica_id_in_sync_group)
        _, _, new_q = debiasmatch.debiasmatch_loss(
            labeled_logits=labeled, labels=labels, weak_logits=replica_weak, strong_logits=strong,
            running_mean=q, momentum=0.5, replica_context=context,
        )
        return new_q

    per_replica = two_cpu_strategy.experimental_local_results(two_cpu_strategy.run(step))
    batch_mean = 0.5 * (np.exp(_log_softmax(weak)).mean(0) + np.exp(_log_softmax(other_weak)).mean(0))
    expected = 0.5 * q + 0.5 * batch_mean
    for new_q in per_replica:
        np.testing.assert_allclose(new_q.numpy(), expected, rtol=1e-5)
