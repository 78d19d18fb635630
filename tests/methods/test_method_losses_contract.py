"""What every method loss promises: unlabeled true labels only feed monitoring metrics,
half-precision logits give the float32 loss, and the result is a scalar plus scalar metrics."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.methods import debiasmatch, dst, fixmatch, mean_teacher, mpl, semivit, uda

B, U, C = 6, 16, 5


def _inputs(seed):
    rng = np.random.default_rng(seed)
    f = lambda n: (2.5 * rng.normal(size=(n, C))).astype(np.float32)  # noqa: E731
    return {
        "labeled": f(B), "labels": rng.integers(0, C, size=B), "weak": f(U), "strong": f(U),
        "extra_l": f(B), "extra_u": f(U),
    }


def _fixmatch(x, cast, unlabeled_labels):
    return fixmatch.fixmatch_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], weak_logits=cast(x["weak"]),
        strong_logits=cast(x["strong"]), threshold=0.6, unlabeled_labels=unlabeled_labels,
    )


def _uda(x, cast, unlabeled_labels):
    return uda.uda_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], weak_logits=cast(x["weak"]),
        strong_logits=cast(x["strong"]), progress=0.3, tsa="linear", confidence=0.5,
        unlabeled_labels=unlabeled_labels,
    )


def _mean_teacher(x, cast, unlabeled_labels):
    return mean_teacher.mean_teacher_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], student_logits=cast(x["strong"]),
        teacher_logits=cast(x["weak"]), progress=0.2, unlabeled_labels=unlabeled_labels,
    )


def _debiasmatch(x, cast, unlabeled_labels):
    loss, metrics, _ = debiasmatch.debiasmatch_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], weak_logits=cast(x["weak"]),
        strong_logits=cast(x["strong"]), running_mean=debiasmatch.initial_running_mean(C),
        threshold=0.6, unlabeled_labels=unlabeled_labels,
    )
    return loss, metrics


def _dst(x, cast, unlabeled_labels):
    return dst.dst_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], weak_logits=cast(x["weak"]),
        pseudo_strong_logits=cast(x["strong"]), worst_labeled_logits=cast(x["extra_l"]),
        worst_unlabeled_logits=cast(x["extra_u"]), threshold=0.6, unlabeled_labels=unlabeled_labels,
    )


def _mpl(x, cast, unlabeled_labels):
    # The teacher's objective; the student's is a plain cross-entropy on its pseudo-labels.
    return mpl.teacher_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], weak_logits=cast(x["weak"]),
        strong_logits=cast(x["strong"]), pseudo_labels=tf.argmax(x["strong"], axis=-1), reward=0.3,
        confidence=0.5, unlabeled_labels=unlabeled_labels,
    )


def _semivit(x, cast, unlabeled_labels):
    # Each row mixed with the next one's image (a permutation of the batch).
    return semivit.probabilistic_pseudo_mixup_loss(
        labeled_logits=cast(x["labeled"]), labels=x["labels"], teacher_logits=cast(x["weak"]),
        partner_teacher_logits=tf.roll(cast(x["weak"]), shift=-1, axis=0), mixed_logits=cast(x["strong"]),
        threshold=0.6, unlabeled_labels=unlabeled_labels,
    )


METHODS = {
    "fixmatch": (_fixmatch, "pseudo_label_acc"),
    "uda": (_uda, "pseudo_label_acc"),
    "mean_teacher": (_mean_teacher, "teacher_acc"),
    "debiasmatch": (_debiasmatch, "pseudo_label_acc"),
    "dst": (_dst, "pseudo_label_acc"),
    "mpl": (_mpl, "pseudo_label_acc"),
    "semivit": (_semivit, "pseudo_label_acc"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unlabeled_true_labels_change_only_monitoring_metrics(method):
    fn, monitor = METHODS[method]
    x = _inputs(0)
    rng = np.random.default_rng(1)
    variables = {k: tf.Variable(x[k]) for k in ("labeled", "weak", "strong", "extra_l", "extra_u")}
    results = []
    for unlabeled_labels in [None, rng.integers(0, C, size=U), rng.integers(0, C, size=U)]:
        with tf.GradientTape() as tape:
            loss, metrics = fn({**x, **variables}, tf.identity,
                               None if unlabeled_labels is None else tf.constant(unlabeled_labels))
        grads = tape.gradient(loss, list(variables.values()))
        results.append((loss.numpy(), metrics, [None if g is None else g.numpy() for g in grads]))

    (loss0, metrics0, grads0), (loss1, metrics1, grads1), (loss2, metrics2, grads2) = results
    for loss, metrics, grads in [(loss1, metrics1, grads1), (loss2, metrics2, grads2)]:
        assert loss == loss0
        for g, g0 in zip(grads, grads0):
            assert (g is None and g0 is None) or np.array_equal(g, g0)
        assert set(metrics) == set(metrics0) | {monitor}
        for name in metrics0:
            assert metrics[name].numpy() == metrics0[name].numpy(), name
    # The monitoring metric exists only with true labels, and follows them.
    assert monitor not in metrics0
    assert metrics1[monitor].numpy() != metrics2[monitor].numpy()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_logits_give_a_float32_loss(method, dtype):
    fn, _ = METHODS[method]
    x = _inputs(2)
    # Logits that are exact in the half type, so both calls see the same numbers.
    x = {k: (v if k == "labels" else tf.cast(tf.cast(v, dtype), tf.float32).numpy()) for k, v in x.items()}
    loss_half, metrics_half = fn(x, lambda v: tf.cast(v, dtype), tf.zeros([U], tf.int32))
    loss_full, _ = fn(x, tf.constant, tf.zeros([U], tf.int32))
    assert loss_half.dtype == tf.float32 and loss_half.shape == ()
    np.testing.assert_allclose(loss_half.numpy(), loss_full.numpy(), rtol=1e-5)
    for name, value in metrics_half.items():
        assert value.shape == () and value.dtype == tf.float32, name
