"""Student noise: dropout and stochastic depth (`simclr_tf/models/noise.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import models
from simclr_tf.config import ModelConfig
from simclr_tf.models.noise import RandomDrop, stochastic_depth_rates
from simclr_tf.train import checkpoints


def test_stochastic_depth_rates_decay_linearly_to_the_last_block():
    np.testing.assert_allclose(stochastic_depth_rates(0.2, 4), [0.05, 0.1, 0.15, 0.2])
    backbone = models.ResNet(resnet_depth=18, width_multiplier=0.25, cifar_stem=True,
                             stochastic_depth_rate=0.2)
    per_block = [block.stochastic_depth.rate for group in backbone.block_groups for block in group.blocks]
    np.testing.assert_allclose(per_block, [0.2 * i / 8 for i in range(1, 9)])
    assert not any(isinstance(layer, RandomDrop) for layer in backbone.stem._flatten_layers())
    with pytest.raises(ValueError, match="rate"):
        stochastic_depth_rates(1.0, 4)


@pytest.mark.parametrize("per_example", [False, True])
def test_random_drop_is_the_identity_at_inference_and_keeps_the_mean_in_training(per_example):
    rate = 0.3
    layer = RandomDrop(rate, per_example=per_example, seed=1)
    x = tf.random.stateless_uniform((20_000, 4), seed=(1, 2)) + 0.5
    np.testing.assert_array_equal(layer(x, training=False), x)
    out = layer(x, training=True).numpy()
    dropped = out == 0
    if per_example:  # an example's row is dropped or kept as a whole
        assert np.all(dropped.all(axis=1) | ~dropped.any(axis=1))
    kept_scale = out[~dropped] / x.numpy()[~dropped]
    np.testing.assert_allclose(kept_scale, 1 / (1 - rate), rtol=1e-6)
    # Drop fraction and the mean within 5 standard errors (binomial) of their expectation.
    units = len(x) if per_example else x.shape[0] * x.shape[1]
    tolerance = 5 * np.sqrt(rate * (1 - rate) / units)
    assert abs(dropped.mean() - rate) < tolerance
    assert abs(out.mean() / x.numpy().mean() - 1) < tolerance / (1 - rate) * 1.5
    # A new mask on every call.
    assert not np.array_equal(layer(x, training=True).numpy() == 0, dropped)


def test_replicas_draw_different_masks(two_cpu_strategy):
    with two_cpu_strategy.scope():
        layer = RandomDrop(0.5, seed=3)
    ones = two_cpu_strategy.experimental_distribute_values_from_function(lambda _: tf.ones((64, 8)))
    outputs = tf.function(lambda x: two_cpu_strategy.run(lambda y: layer(y, training=True), args=(x,)))(ones)
    first, second = (t.numpy() for t in two_cpu_strategy.experimental_local_results(outputs))
    assert 0.3 < (first == 0).mean() < 0.7 and 0.3 < (second == 0).mean() < 0.7
    assert not np.array_equal(first == 0, second == 0)


def _noisy_and_plain(**overrides):
    base = ModelConfig(resnet_depth=10, width_multiplier=0.25, image_size=16, **overrides)
    noisy = models.build_model(base.__class__(**{**base.__dict__, "dropout_rate": 0.5,
                                                 "stochastic_depth_rate": 0.5}), num_classes=10)
    plain = models.build_model(base, num_classes=10)
    plain.set_weights(noisy.get_weights())
    return noisy, plain


def test_noise_is_off_in_eval_on_in_training_and_adds_no_checkpointed_variable():
    noisy, plain = _noisy_and_plain()
    images = tf.random.stateless_uniform((8, 16, 16, 3), seed=(0, 1))
    for key in ("final_avg_pool", "logits_sup"):
        np.testing.assert_array_equal(noisy(images, training=False)[key], plain(images, training=False)[key])
    # Training: batch norm uses batch statistics in both, so only the noise differs.
    # The zero-initialised last BN makes residual branches 0 at the start: give them weight.
    for model in (noisy, plain):
        for variable in model.weights:
            if variable.path.endswith("gamma"):
                variable.assign(tf.ones_like(variable))
    noisy_out, plain_out = noisy(images, training=True), plain(images, training=True)
    for key in ("final_avg_pool", "logits_sup"):
        assert np.abs(noisy_out[key] - plain_out[key]).max() > 1e-3, key
    # Same checkpoint layout: a noisy student and a plain teacher exchange checkpoints.
    assert list(checkpoints.model_variables_by_path(noisy)) == list(checkpoints.model_variables_by_path(plain))


def test_a_frozen_backbone_gets_no_stochastic_depth():
    noisy, _ = _noisy_and_plain(fine_tune_after_block=4)
    for variable in noisy.weights:
        if variable.path.endswith("gamma"):
            variable.assign(tf.ones_like(variable))
    images = tf.random.stateless_uniform((8, 16, 16, 3), seed=(0, 2))
    np.testing.assert_array_equal(noisy(images, training=True)["final_avg_pool"],
                                  noisy(images, training=True)["final_avg_pool"])
