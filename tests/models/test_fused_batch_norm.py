"""The fused batch-norm kernel: the same numbers as NumPy and as the Keras layer it replaces.

`global_bn=True` on one replica runs Keras's own (synchronized) BatchNormalization, so it
is the reference for gradients; NumPy is the reference for outputs and moving statistics.
BatchNormRelu uses the fused kernel only without oneDNN (`resnet.USE_FUSED_BATCH_NORM`);
the tests force it on, so it is checked whichever way TensorFlow runs here.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import build_model, resnet
from simclr_tf.config import ModelConfig
from simclr_tf.models.resnet import BATCH_NORM_EPSILON, BatchNormRelu

MOMENTUM = 0.9


@pytest.fixture(autouse=True)
def fused_kernel(monkeypatch):
    monkeypatch.setattr(resnet, "USE_FUSED_BATCH_NORM", not resnet.onednn_enabled())


def _pair(shape, **kwargs):
    """A fused layer and a Keras-path layer with the same random weights."""
    rng = np.random.default_rng(0)
    fused, keras_path = BatchNormRelu(relu=False, **kwargs), BatchNormRelu(relu=False, global_bn=True, **kwargs)
    fused.build(shape), keras_path.build(shape)
    weights = [rng.uniform(0.5, 2.0, size=v.shape).astype("float32") for v in fused.weights]
    fused.set_weights(weights), keras_path.set_weights(weights)
    inputs = tf.constant(rng.normal(1.0, 3.0, size=shape).astype("float32"))
    return fused, keras_path, inputs, weights


def _numpy_batch_norm(x, gamma, beta, mean, variance):
    return gamma * (x - mean) / np.sqrt(variance + BATCH_NORM_EPSILON) + beta


@pytest.mark.parametrize("in_graph", [False, True])  # training runs in a tf.function (other kernels)
@pytest.mark.parametrize("shape", [(8, 5, 5, 16), (6, 16), (3, 1, 1, 4)])
def test_training_matches_numpy_and_updates_moving_statistics(shape, in_graph):
    fused, _, inputs, (gamma, beta, moving_mean, moving_variance) = _pair(shape)
    call = lambda x: fused(x, training=True)  # noqa: E731
    outputs = (tf.function(call) if in_graph else call)(inputs).numpy()

    x = inputs.numpy().reshape(-1, shape[-1]).astype(np.float64)
    mean, variance = x.mean(axis=0), x.var(axis=0)  # biased, as Keras
    expected = _numpy_batch_norm(x, gamma, beta, mean, variance).reshape(shape)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.bn.moving_mean.numpy(), MOMENTUM * moving_mean + (1 - MOMENTUM) * mean, rtol=1e-6)
    np.testing.assert_allclose(
        fused.bn.moving_variance.numpy(), MOMENTUM * moving_variance + (1 - MOMENTUM) * variance, rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(8, 5, 5, 16), (6, 16)])
def test_inference_uses_moving_statistics_and_leaves_them(shape):
    fused, _, inputs, (gamma, beta, moving_mean, moving_variance) = _pair(shape)
    outputs = fused(inputs, training=False).numpy()
    expected = _numpy_batch_norm(inputs.numpy(), gamma, beta, moving_mean, moving_variance)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused.bn.moving_mean.numpy(), moving_mean)
    np.testing.assert_array_equal(fused.bn.moving_variance.numpy(), moving_variance)


def test_a_frozen_layer_normalises_with_moving_statistics_in_training():
    fused, _, inputs, (gamma, beta, moving_mean, moving_variance) = _pair((4, 3, 3, 8), trainable=False)
    outputs = fused(inputs, training=True).numpy()
    np.testing.assert_allclose(
        outputs, _numpy_batch_norm(inputs.numpy(), gamma, beta, moving_mean, moving_variance), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(fused.bn.moving_variance.numpy(), moving_variance)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 5, 5, 16), (6, 16)])
def test_gradients_match_the_keras_layer(shape, training):
    fused, keras_path, inputs, _ = _pair(shape)
    # Random weights per output: under batch statistics a plain sum of outputs has no gradient.
    output_weights = tf.random.stateless_normal(shape, seed=[3, 4])
    gradients = []
    for layer in (fused, keras_path):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(layer(inputs, training=training) * output_weights)
        gradients.append(tape.gradient(loss, [inputs, *layer.trainable_weights]))
    for fused_grad, keras_grad in zip(*gradients):
        scale = float(tf.reduce_max(tf.abs(keras_grad)))
        np.testing.assert_allclose(fused_grad.numpy(), keras_grad.numpy(), atol=1e-5 * scale)


def test_mixed_bfloat16_model_stays_in_bfloat16_and_matches_the_keras_path():
    config = ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=16, num_proj_layers=2)
    models = [build_model(config, num_classes=10, global_bn=g, dtype="mixed_bfloat16") for g in (False, True)]
    images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])
    models[1].set_weights(models[0].get_weights())
    fused, keras_path = (m(images, training=True)["final_avg_pool"] for m in models)
    assert fused.dtype == tf.bfloat16
    np.testing.assert_allclose(
        tf.cast(fused, tf.float32).numpy(), tf.cast(keras_path, tf.float32).numpy(), rtol=0.05, atol=0.05
    )


def _resnet_gradients(model, images, labels):
    @tf.function  # traced anew per call: the fused/Keras choice is made while tracing
    def gradients():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)["logits_sup"][: len(labels)]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return tape.gradient(loss, model.trainable_variables)

    return [g.numpy() for g in gradients()]


@pytest.mark.parametrize("seed", [5, 8])
def test_resnet_gradients_match_keras_batch_norm_whichever_path_the_layer_takes(seed, monkeypatch):
    # Under oneDNN, a graph with the fused kernel got gradients off by 1.5e-4 (seed 5) and
    # 2.4e-3 (seed 8) of a variable's scale on this model, the loss on the first 8 of 24
    # images (as a semi-supervised step's labeled part), Keras' path ~5e-6 from itself
    # computed otherwise. The layer's own choice must give Keras' gradients.
    monkeypatch.setattr(resnet, "USE_FUSED_BATCH_NORM", not resnet.onednn_enabled())
    config = ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=16, num_proj_layers=2)
    keras.utils.set_random_seed(seed)
    model = build_model(config, num_classes=10, global_bn=False, drop_unused_projection_layers=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.3, 1.0, 24, dtype="float32")[:, None, None, None]
    images = tf.constant(rng.uniform(size=(24, 16, 16, 3)).astype("float32") * ramp)
    labels = tf.constant(rng.integers(0, 10, 8))
    initial = model.get_weights()
    chosen = _resnet_gradients(model, images, labels)
    model.set_weights(initial)  # the step moved the moving statistics
    monkeypatch.setattr(resnet, "USE_FUSED_BATCH_NORM", False)
    reference = _resnet_gradients(model, images, labels)
    errors = [np.abs(a - b).max() / max(np.abs(b).max(), 1e-12) for a, b in zip(chosen, reference)]
    assert max(errors) < 5e-5
