"""Global batch norm: exact global moments, and reductions that pair up by layer on every replica."""

from __future__ import annotations

import collections
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models.global_batch_norm import GlobalBatchNormalization, cross_replica_moments
from simclr_tf.models.resnet import BatchNormRelu


def per_replica(strategy, array: np.ndarray):
    """Replica r holds the r-th half of `array` along axis 0."""
    halves = np.split(array, strategy.num_replicas_in_sync)
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(halves[context.replica_id_in_sync_group])
    )


def test_moments_and_their_gradient_are_those_of_the_global_batch(two_cpu_strategy):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 3, 3, 4)).astype("float32") * np.linspace(0.5, 2.0, 6, dtype="float32")[:, None, None, None]
    weights = rng.normal(size=(2, 4)).astype("float32")  # loss = sum(w0 * mean + w1 * var)

    def loss_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            mean, variance = cross_replica_moments(x, [0, 1, 2])
            # Each replica's share of the loss, as a training step scales it.
            loss = tf.reduce_sum(weights[0] * mean + weights[1] * variance) / two_cpu_strategy.num_replicas_in_sync
        return mean, variance, tape.gradient(loss, x)

    @tf.function
    def distributed(x):
        return two_cpu_strategy.run(loss_and_gradient, args=(x,))

    mean, variance, gradient = distributed(per_replica(two_cpu_strategy, images))
    flat = images.reshape(-1, 4).astype("float64")
    expected_mean, expected_variance = flat.mean(0), flat.var(0)
    # d/dx of sum_c w0 mean_c + w1 var_c, for the element x of channel c: (w0 + 2 w1 (x - mean_c)) / n
    expected_gradient = (weights[0] + 2 * weights[1] * (images - expected_mean)) / len(flat)
    gradients = two_cpu_strategy.experimental_local_results(gradient)
    for replica, (m, v) in enumerate(zip(two_cpu_strategy.experimental_local_results(mean),
                                         two_cpu_strategy.experimental_local_results(variance))):
        np.testing.assert_allclose(m, expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v, expected_variance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(gradients), expected_gradient, rtol=1e-4, atol=1e-6)


def test_without_replicas_the_moments_are_local():
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    mean, variance = cross_replica_moments(tf.constant(x), [0, 1])
    np.testing.assert_allclose(mean, x.reshape(-1, 4).mean(0), rtol=1e-6)
    np.testing.assert_allclose(variance, x.reshape(-1, 4).var(0), rtol=1e-6)


class ParallelBranches(keras.layers.Layer):
    """h = dense(x); bn_merged(relu(bn_a(h) + bn_b(2h))): same-shaped reductions on parallel paths.

    The dense layer below them makes backprop reach the branches' statistics.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.branch_a = BatchNormRelu(relu=False, global_bn=True, name="branch_a")
        self.branch_b = BatchNormRelu(relu=False, global_bn=True, name="branch_b")
        self.merged = BatchNormRelu(global_bn=True, name="merged")
        self.dense = keras.layers.Dense(4, name="dense")

    def call(self, x, training=False):
        h = self.dense(x)
        summed = self.branch_a(h, training=training) + self.branch_b(2.0 * h, training=training)
        return self.merged(keras.ops.relu(summed), training=training)


def layer_of(tensor: tf.Tensor) -> str:
    """The layer a reduced tensor belongs to: a forward one is named after it, a gradient
    (an AddN of slice gradients) after the ops it sums."""
    for name in [tensor.name, *(t.name for t in tensor.op.inputs)]:
        match = re.search(r"(branch_a|branch_b|merged)", name)
        if match:
            return match.group(1)
    raise AssertionError(f"no layer in {tensor.name}")


def record_all_reduces(monkeypatch) -> dict[int, list[tuple[str, str]]]:
    """Per replica, ("forward" | "backward", the reduced tensor's layer) in the order issued.

    The gradient of an all-reduce calls `all_reduce` again (on a tuple), so one patch sees both.
    """
    calls: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    original = tf.distribute.ReplicaContext.all_reduce

    def recording(self, reduce_op, value, options=None):
        replica = int(tf.get_static_value(self.replica_id_in_sync_group))
        if isinstance(value, tf.Tensor):
            calls[replica].append(("forward", layer_of(value)))
        else:
            calls[replica].append(("backward", layer_of(value[0])))
        return original(self, reduce_op, value, options)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", recording)
    return calls


def test_backprop_reduces_layer_by_layer_in_reverse_forward_order_on_every_replica(two_cpu_strategy, monkeypatch):
    # Keras' synchronized batch norm issued the two branches' gradient reductions
    # interleaved (a's and b's sums, then a's and b's squares), in an order backprop
    # chose per replica; replicas that chose differently summed a's gradient with b's.
    with two_cpu_strategy.scope():
        layer = ParallelBranches()
        layer(np.zeros((2, 4), "float32"))  # builds the variables
    calls = record_all_reduces(monkeypatch)

    def replica_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, training=True) - 0.5))
        return tape.gradient(loss, layer.trainable_variables)

    @tf.function
    def step(x):
        return two_cpu_strategy.run(replica_step, args=(x,))

    step(per_replica(two_cpu_strategy, np.random.default_rng(1).normal(size=(8, 4)).astype("float32")))
    assert set(calls) == {0, 1}
    forward = [("forward", name) for name in ("branch_a", "branch_b", "merged")]
    for replica, issued in calls.items():
        backward = [("backward", name) for _, name in reversed(forward)]
        assert issued == forward + backward, f"replica {replica}: {issued}"


def test_the_layer_keeps_keras_variables_and_config():
    layer = GlobalBatchNormalization(synchronized=True, momentum=0.9, epsilon=1e-5, name="batch_normalization")
    layer.build((None, 3))
    assert [v.path for v in layer.weights] == [
        "batch_normalization/gamma", "batch_normalization/beta",
        "batch_normalization/moving_mean", "batch_normalization/moving_variance",
    ]
    config = layer.get_config()
    assert config["synchronized"] is True
    assert keras.layers.BatchNormalization.from_config(config).get_config() == config


@pytest.mark.parametrize("synchronized", [False, True])
def test_without_replicas_it_normalises_as_keras_does(synchronized):
    x = np.random.default_rng(2).normal(size=(5, 2, 2, 3)).astype("float32") * 3 + 1
    ours = GlobalBatchNormalization(synchronized=synchronized)
    theirs = keras.layers.BatchNormalization(synchronized=synchronized)
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_variance, theirs.moving_variance, rtol=1e-6)
