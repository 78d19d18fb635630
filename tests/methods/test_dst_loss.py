"""dst_loss against a NumPy reference of Debiased Self-Training, and which head learns from what."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import dst


def _log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference(main_l, labels, main_uw, pseudo_us, worst_l, worst_uw, threshold, w_st, w_wc, eta_prime):
    sup = -_log_softmax(main_l)[np.arange(len(labels)), labels].mean()
    p_weak = np.exp(_log_softmax(main_uw))
    targets = p_weak.argmax(axis=1)
    mask = p_weak.max(axis=1) > threshold
    self_training = (-_log_softmax(pseudo_us)[np.arange(len(targets)), targets] * mask).mean()
    # Worst head: agree with the main head's predictions on labeled data, contradict
    # them on unlabeled data (-log(1 - p), p shifted by 1e-6 and capped at log 1).
    pred_l = main_l.argmax(axis=1)
    agree = -_log_softmax(worst_l)[np.arange(len(pred_l)), pred_l].mean()
    p_worst = np.exp(_log_softmax(worst_uw))[np.arange(len(targets)), targets]
    contradict = -np.log(np.minimum(1.0 - p_worst + 1e-6, 1.0)).mean()
    worst = eta_prime * agree + contradict
    return sup + w_st * self_training + w_wc * worst, sup, self_training, worst, mask, targets


def _batch(seed, b=6, u=12, c=5):
    rng = np.random.default_rng(seed)
    f = lambda *shape: (2.5 * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    return dict(
        labeled_logits=f(b, c),
        labels=rng.integers(0, c, size=b),
        weak_logits=f(u, c),
        pseudo_strong_logits=f(u, c),
        worst_labeled_logits=f(b, c),
        worst_unlabeled_logits=f(u, c),
    ), rng.integers(0, c, size=u)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.95])
@pytest.mark.parametrize("weights", [(1.0, 0.3, 2.0), (0.5, 1.0, 1.0)])
def test_dst_matches_numpy(threshold, weights):
    w_st, w_wc, eta_prime = weights
    batch, true_u = _batch(0)
    loss, metrics = dst.dst_loss(
        **{k: tf.constant(v) for k, v in batch.items()},
        threshold=threshold, self_training_weight=w_st, worst_case_weight=w_wc,
        eta_prime=eta_prime, unlabeled_labels=tf.constant(true_u),
    )
    ref, sup, st, worst, mask, targets = _reference(*batch.values(), threshold, w_st, w_wc, eta_prime)
    if threshold == 0.7:
        assert 0 < mask.sum() < len(mask)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), st, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["worst_case_loss"].numpy(), worst, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    expected_acc = (targets[mask] == true_u[mask]).mean() if mask.any() else 0.0
    np.testing.assert_allclose(metrics["pseudo_label_acc"].numpy(), expected_acc, rtol=1e-6)


def test_pseudo_label_mask_is_strict():
    batch, _ = _batch(1, c=2)
    batch["weak_logits"] = np.array([[0.0, 0.0]] * 12, np.float32)  # max probability 0.5
    _, metrics = dst.dst_loss(**batch, threshold=0.5)
    assert metrics["mask_rate"].numpy() == 0.0


def test_worst_case_loss_stays_finite_when_the_worst_head_agrees_fully():
    logits = np.array([[30.0, -30.0]], np.float32)  # p_worst of the main class rounds to 1
    loss = dst.worst_case_estimation_loss(
        labeled_logits=logits, worst_labeled_logits=logits, weak_logits=logits,
        worst_unlabeled_logits=logits, eta_prime=2.0,
    )
    np.testing.assert_allclose(loss.numpy(), -np.log(1e-6), rtol=1e-3)


def test_grl_coefficient_matches_tllib_schedule():
    for progress in [0.0, 0.05, 0.1, 0.5, 1.0]:
        i_over_n = progress / 0.1
        expected = 2.0 * 0.1 / (1.0 + np.exp(-i_over_n)) - 0.1
        value = dst.grl_coefficient(tf.constant(progress), max_coefficient=0.1, warmup_fraction=0.1)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-8)
    assert dst.grl_coefficient(0.0).numpy() == 0.0


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = tf.Variable(np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32))
    upstream = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    with tf.GradientTape() as tape:
        y = dst.gradient_reversal(x, tf.constant(0.25))
        total = tf.reduce_sum(y * upstream)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(total, x).numpy(), -0.25 * upstream, rtol=1e-6)


def test_each_head_learns_only_from_its_own_terms():
    """Tiny linear model: shared features f = x W_f, heads h = f W_main, h_pseudo = f W_pseudo,
    h_worst = R(f) W_worst with R the gradient reversal."""
    rng = np.random.default_rng(4)
    d_in, d, c = 4, 6, 3
    x_l, x_uw, x_us = (rng.normal(size=(n, d_in)).astype(np.float32) for n in (5, 8, 8))
    labels = rng.integers(0, c, size=5)
    names = ["features", "main", "pseudo", "worst"]
    shapes = [(d_in, d), (d, c), (d, c), (d, c)]
    params = {n: tf.Variable(0.7 * rng.normal(size=s).astype(np.float32)) for n, s in zip(names, shapes)}
    coefficient, w_st, w_wc = 0.05, 0.7, 0.3

    def forward(reverse):
        def heads(x):
            f = x @ params["features"]
            f_worst = dst.gradient_reversal(f, coefficient) if reverse else f
            return f @ params["main"], f @ params["pseudo"], f_worst @ params["worst"]

        (main_l, _, worst_l), (main_uw, _, worst_uw), (_, pseudo_us, _) = map(heads, (x_l, x_uw, x_us))
        return dst.dst_loss(
            labeled_logits=main_l, labels=labels, weak_logits=main_uw, pseudo_strong_logits=pseudo_us,
            worst_labeled_logits=worst_l, worst_unlabeled_logits=worst_uw, threshold=0.6,
            self_training_weight=w_st, worst_case_weight=w_wc,
        )

    with tf.GradientTape(persistent=True) as tape:
        loss, metrics = forward(reverse=True)
        _, plain_metrics = forward(reverse=False)
    assert 0 < metrics["mask_rate"].numpy() < 1
    grads = lambda target: dict(zip(names, tape.gradient(target, list(params.values()))))  # noqa: E731
    total, sup = grads(loss), grads(metrics["supervised_loss"])
    st, worst = grads(metrics["unlabeled_loss"]), grads(metrics["worst_case_loss"])

    # Main head: labeled CE only; pseudo-labels and worst-case targets are constants.
    assert st["main"] is None and worst["main"] is None
    np.testing.assert_allclose(total["main"].numpy(), sup["main"].numpy(), rtol=1e-5, atol=1e-7)
    # Pseudo head: self-training only.
    assert sup["pseudo"] is None and worst["pseudo"] is None
    np.testing.assert_allclose(total["pseudo"].numpy(), w_st * st["pseudo"].numpy(), rtol=1e-5, atol=1e-7)
    # Worst head: worst-case term only, and it does learn.
    assert sup["worst"] is None and st["worst"] is None
    np.testing.assert_allclose(total["worst"].numpy(), w_wc * worst["worst"].numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(worst["worst"].numpy()).sum() > 0
    # Features: learn from the pseudo-labels, and against the worst head (reversed, scaled).
    assert np.abs(st["features"].numpy()).sum() > 0
    plain_worst_features = tape.gradient(plain_metrics["worst_case_loss"], params["features"])
    np.testing.assert_allclose(
        worst["features"].numpy(), -coefficient * plain_worst_features.numpy(), rtol=1e-4, atol=1e-7
    )


def test_gradient_reversal_inside_tf_function_with_a_progress_dependent_scale():
    x = tf.Variable([[1.0, 2.0]])
    progress = tf.Variable(0.5)

    @tf.function
    def reversed_gradient():
        with tf.GradientTape() as tape:
            y = dst.gradient_reversal(x, dst.grl_coefficient(progress))
            total = tf.reduce_sum(y * [[3.0, 4.0]])
        return tape.gradient(total, x)

    scale = 2.0 * 0.1 / (1.0 + np.exp(-5.0)) - 0.1  # progress 0.5 = 5 warm-up lengths
    np.testing.assert_allclose(reversed_gradient().numpy(), -scale * np.array([[3.0, 4.0]]), rtol=1e-5)
    progress.assign(0.0)  # Scale 0: nothing flows back, without retracing.
    np.testing.assert_allclose(reversed_gradient().numpy(), [[0.0, 0.0]], atol=1e-8)
