"""simclr_tf.losses against NumPy references written from the definitions."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses



def _nt_xent_reference(projections, temperature, hidden_norm):
    """Textbook NT-Xent: for each of the 2B anchors, -log softmax of its positive over all
    2B - 1 other rows; loss = sum over anchors / B (= mean over examples of la + lb)."""
    z = projections.astype(np.float64)
    if hidden_norm:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = z.shape[0]
    b = n // 2
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        others = [sim[i, k] for k in range(n) if k != i]
        top = max(others)
        log_sum_exp = top + np.log(sum(np.exp(s - top) for s in others))
        total += log_sum_exp - sim[i, positive]
    loss = total / b

    # Metrics on the view1-vs-view2 block only.
    block = sim[:b, b:]
    acc = np.mean([np.argmax(block[i]) == i for i in range(b)])
    prob = np.exp(block - block.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    entropy = -np.mean(np.sum(prob * np.log(prob + 1e-8), axis=1))
    return loss, acc, entropy


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("hidden_norm", [True, False])
def test_nt_xent_matches_numpy(temperature, hidden_norm):
    rng = np.random.default_rng(int(temperature * 100) + hidden_norm)
    # Half-correlated views so the accuracy is neither 0 nor 1.
    base = rng.normal(size=(6, 5))
    projections = np.concatenate([base, base + 1.5 * rng.normal(size=(6, 5))]).astype(np.float32)
    if not hidden_norm:
        projections *= 0.3  # Keeps unnormalised logits in a sane range.

    loss, metrics = losses.nt_xent_loss(
        projections=tf.constant(projections), temperature=temperature, hidden_norm=hidden_norm
    )
    ref_loss, ref_acc, ref_entropy = _nt_xent_reference(projections, temperature, hidden_norm)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrast_loss"].numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrast_acc"].numpy(), ref_acc)
    np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), ref_entropy, rtol=1e-4, atol=1e-6)
    assert loss.shape == () and metrics["contrast_acc"].shape == ()


def test_nt_xent_accuracy_counts_misses():
    # Views swapped between examples 0 and 1: their positives are not the argmax.
    e = np.eye(3, dtype=np.float32)
    projections = np.concatenate([e, e[[1, 0, 2]]])
    _, metrics = losses.nt_xent_loss(projections=tf.constant(projections), temperature=0.1)
    np.testing.assert_allclose(metrics["contrast_acc"].numpy(), 1.0 / 3.0, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.25, 1.0])
def test_nt_xent_orthogonal_pair_by_hand(temperature):
    # Two examples, both views identical, examples orthogonal (after normalisation).
    # Each anchor: similarity 1/T to its positive, 0 to the two other non-self rows, so
    # loss per anchor = log(1 + 2 exp(-1/T)); four anchors / B=2 -> twice that.
    view = np.array([[3.0, 0.0], [0.0, 0.5]], np.float32)
    projections = tf.constant(np.concatenate([view, view]))
    loss, metrics = losses.nt_xent_loss(projections=projections, temperature=temperature)
    expected = 2.0 * np.log(1.0 + 2.0 * np.exp(-1.0 / temperature))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # logits_ab rows are [1/T, 0]: positive wins; softmax entropy of a two-way split.
    p = 1.0 / (1.0 + np.exp(-1.0 / temperature))
    entropy = -(p * np.log(p + 1e-8) + (1 - p) * np.log(1 - p + 1e-8))
    assert metrics["contrast_acc"].numpy() == 1.0
    np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), entropy, rtol=1e-5)


def _local_batches(global_projections, num_replicas):
    """Splits a view-major (2B, D) batch into R view-major (2B/R, D) shards."""
    view1, view2 = np.split(global_projections, 2)
    return [
        np.concatenate([a, b]) for a, b in zip(np.split(view1, num_replicas), np.split(view2, num_replicas))
    ]


def test_nt_xent_cross_replica_matches_single_replica(two_cpu_strategy):
    strategy = two_cpu_strategy
    replicas = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    global_batch, dim_in, dim = 8, 6, 4
    inputs = rng.normal(size=(2 * global_batch, dim_in)).astype(np.float32)
    kernel_init = rng.normal(size=(dim_in, dim)).astype(np.float32)
    temperature = 0.2

    # Single replica on the whole batch: loss and gradients w.r.t. the projections and
    # a linear layer's kernel.
    kernel = tf.Variable(kernel_init)
    with tf.GradientTape(persistent=True) as tape:
        projections = tf.matmul(tf.constant(inputs), kernel)
        ref_loss, ref_metrics = losses.nt_xent_loss(projections=projections, temperature=temperature)
    ref_grad_proj = _local_batches(tape.gradient(ref_loss, projections).numpy(), replicas)
    ref_grad_kernel = tape.gradient(ref_loss, kernel).numpy()
    del tape

    with strategy.scope():
        dist_kernel = tf.Variable(kernel_init)
    local_inputs = _local_batches(inputs, replicas)
    dist_inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local_inputs[ctx.replica_id_in_sync_group])
    )

    @tf.function
    def step(x):
        def replica_fn(x):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape(persistent=True) as tape:
                projections = tf.matmul(x, dist_kernel)
                loss, metrics = losses.nt_xent_loss(
                    projections=projections, temperature=temperature, replica_context=ctx
                )
                # What the trainer does: Keras then sums gradients over replicas.
                scaled = loss / ctx.num_replicas_in_sync
            grad_proj = tape.gradient(scaled, projections)
            grad_kernel = tape.gradient(scaled, dist_kernel)
            return loss, metrics["contrast_acc"], grad_proj, grad_kernel

        return strategy.run(replica_fn, args=(x,))

    loss, acc, grad_proj, grad_kernel = step(dist_inputs)
    per_replica_loss = [t.numpy() for t in strategy.experimental_local_results(loss)]
    per_replica_acc = [t.numpy() for t in strategy.experimental_local_results(acc)]
    np.testing.assert_allclose(np.mean(per_replica_loss), ref_loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.mean(per_replica_acc), ref_metrics["contrast_acc"].numpy())
    # Each replica's loss is not the global one: the gather really mixes replicas.
    assert not np.allclose(per_replica_loss[0], per_replica_loss[1])

    for local, ref in zip(strategy.experimental_local_results(grad_proj), ref_grad_proj):
        np.testing.assert_allclose(local.numpy(), ref, rtol=1e-4, atol=1e-6)
    summed_kernel_grad = strategy.reduce(tf.distribute.ReduceOp.SUM, grad_kernel, axis=None)
    np.testing.assert_allclose(summed_kernel_grad.numpy(), ref_grad_kernel, rtol=1e-4, atol=1e-6)


def test_nt_xent_without_replica_context_equals_none_under_one_replica():
    rng = np.random.default_rng(1)
    projections = tf.constant(rng.normal(size=(8, 3)).astype(np.float32))
    default_ctx = tf.distribute.get_replica_context()  # Default strategy: 1 replica.
    a, _ = losses.nt_xent_loss(projections=projections, temperature=0.3, replica_context=default_ctx)
    b, _ = losses.nt_xent_loss(projections=projections, temperature=0.3, replica_context=None)
    np.testing.assert_allclose(a.numpy(), b.numpy())


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_supervised_loss_sparse_and_onehot_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=7)
    ref_loss = -np.mean(_log_softmax(logits.astype(np.float64))[np.arange(7), labels])
    ref_acc = np.mean(logits.argmax(-1) == labels)
    for given in (labels, np.eye(5, dtype=np.float32)[labels]):
        loss, metrics = losses.supervised_loss(labels=tf.constant(given), logits=tf.constant(logits))
        np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["supervised_loss"].numpy(), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["supervised_acc"].numpy(), ref_acc)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_loss_matches_numpy(temperature):
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(6, 4)).astype(np.float32) * 2
    student = rng.normal(size=(6, 4)).astype(np.float32)
    p_teacher = np.exp(_log_softmax(teacher.astype(np.float64) / temperature))
    ref = -np.mean(np.sum(p_teacher * _log_softmax(student.astype(np.float64) / temperature), axis=1))
    ref_agree = np.mean(teacher.argmax(-1) == student.argmax(-1))

    teacher_t, student_t = tf.constant(teacher), tf.constant(student)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([teacher_t, student_t])
        loss, metrics = losses.distillation_loss(
            teacher_logits=teacher_t, student_logits=student_t, temperature=temperature
        )
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill_loss"].numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill_agreement"].numpy(), ref_agree)
    # Teacher is a fixed target; the student gets (P_S - P_T) / (tau * B).
    assert tape.gradient(loss, teacher_t) is None
    p_student = np.exp(_log_softmax(student.astype(np.float64) / temperature))
    np.testing.assert_allclose(
        tape.gradient(loss, student_t).numpy(), (p_student - p_teacher) / (temperature * 6), atol=1e-6
    )


def test_weight_decay_loss_matches_numpy():
    rng = np.random.default_rng(4)
    values = [rng.normal(size=s).astype(np.float32) for s in [(3, 2), (4,), ()]]
    variables = [tf.Variable(v) for v in values]
    ref = 1e-3 * sum(0.5 * np.sum(v.astype(np.float64) ** 2) for v in values)
    np.testing.assert_allclose(losses.weight_decay_loss(variables, 1e-3).numpy(), ref, rtol=1e-6)
    assert float(losses.weight_decay_loss([], 1e-3)) == 0.0


def _named_variables():
    paths = [
        "resnet/conv2d/kernel",
        "resnet/batch_norm_relu/batch_normalization/gamma",
        "resnet/batch_norm_relu/batch_normalization/beta",
        "proj_head/dense/kernel",
        "proj_head/dense/bias",
        "head_supervised/dense/kernel",
        "head_supervised/dense/bias",
    ]
    variables = []
    for path in paths:
        *scopes, leaf = path.split("/")
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(keras.name_scope(scope))
            variables.append(keras.Variable(np.ones((2,), np.float32), name=leaf))
    assert [v.path for v in variables] == paths
    return variables


def test_variables_with_loss_weight_decay_selection():
    variables = _named_variables()
    lars = losses.variables_with_loss_weight_decay(variables, "lars")
    assert [v.path for v in lars] == ["head_supervised/dense/kernel"]
    for name in ("momentum", "adam"):
        selected = losses.variables_with_loss_weight_decay(variables, name)
        assert [v.path for v in selected] == [
            "resnet/conv2d/kernel",
            "proj_head/dense/kernel",
            "proj_head/dense/bias",
            "head_supervised/dense/kernel",
            "head_supervised/dense/bias",
        ]
