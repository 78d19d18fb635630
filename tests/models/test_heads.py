"""Projection head, supervised head and their linear layer."""

import keras
import numpy as np
import pytest

from simclr_tf.models.heads import LinearLayer, ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import BatchNormRelu


def _features(n=4, dim=16, seed=0):
    return np.random.RandomState(seed).normal(size=(n, dim)).astype("float32")


def test_linear_layer_same_width_and_init():
    layer = LinearLayer(None)
    layer.build((None, 512))
    assert tuple(layer.dense.kernel.shape) == (512, 512)
    std = float(np.std(layer.dense.kernel.numpy()))
    assert 0.009 < std < 0.011  # RandomNormal(stddev=0.01), 262k samples
    np.testing.assert_array_equal(layer.dense.bias.numpy(), 0.0)
    assert layer.batch_norm is None
    assert layer.compute_output_shape((None, 512)) == (None, 512)


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_layer_with_bn_moves_the_bias_into_the_bn(use_bias):
    layer = LinearLayer(8, use_bias=use_bias, use_bn=True, batch_norm_decay=0.99)
    layer(_features(), training=True)
    assert not layer.dense.use_bias
    assert isinstance(layer.batch_norm, BatchNormRelu)
    assert not layer.batch_norm.relu
    assert layer.batch_norm.bn.center == use_bias
    assert layer.batch_norm.bn.momentum == 0.99
    names = sorted(v.path.split("/")[-1] for v in layer.trainable_weights)
    assert names == (["beta", "gamma", "kernel"] if use_bias else ["gamma", "kernel"])


def test_linear_layer_zero_init_and_rank_check():
    layer = LinearLayer(3, zero_init=True)
    np.testing.assert_array_equal(layer(_features()).numpy(), 0.0)
    with pytest.raises(ValueError, match="batch, features"):
        LinearLayer(3)(np.zeros((2, 4, 4), "float32"))


# (mode, num_layers, ft_proj_selector) -> (number of dense layers, supervised-input width)
# for 16-wide features and out_dim 8.
HEAD_CASES = [
    ("nonlinear", 3, 0, 3, 16),
    ("nonlinear", 3, 1, 3, 16),
    ("nonlinear", 3, 2, 3, 16),
    ("nonlinear", 3, 3, 3, 8),
    ("nonlinear", 3, -1, 3, 8),
    ("nonlinear", 2, -1, 2, 8),
    ("nonlinear", 1, 1, 1, 8),
    ("linear", 3, 0, 1, 16),
    ("linear", 3, 1, 1, 8),
    ("linear", 3, -1, 1, 8),
    ("none", 3, 0, 0, 16),
    ("none", 3, -1, 0, 16),
]


@pytest.mark.parametrize("mode,num_layers,selector,num_dense,sup_width", HEAD_CASES)
def test_projection_head_modes_and_selector(mode, num_layers, selector, num_dense, sup_width):
    head = ProjectionHead(mode, out_dim=8, num_layers=num_layers, ft_proj_selector=selector)
    x = _features()
    output, hiddens = head(x, training=True)
    assert len(head.linear_layers) == num_dense
    assert len(hiddens) == num_dense + 1
    np.testing.assert_array_equal(hiddens[0], x)
    assert hiddens[selector].shape == (4, sup_width)
    assert output.shape == (4, 16 if mode == "none" else 8)
    assert head.supervised_input_shape((4, 16)) == (4, sup_width)
    output_shape, hidden_shapes = head.compute_output_shape((4, 16))
    assert output_shape == tuple(output.shape)
    assert hidden_shapes == [tuple(h.shape) for h in hiddens]


def test_nonlinear_head_layers():
    head = ProjectionHead("nonlinear", out_dim=8, num_layers=3)
    x = _features(n=8)
    output, hiddens = head(x, training=True)
    # Middle layers: input width, bias (BN beta) and ReLU; the last: out_dim, no bias, no ReLU.
    assert [layer.name for layer in head.linear_layers] == ["nl_0", "nl_1", "nl_2"]
    assert [(layer.units, layer.use_bias, layer.use_bn) for layer in head.linear_layers] == [
        (None, True, True),
        (None, True, True),
        (8, False, True),
    ]
    assert np.all(hiddens[1].numpy() >= 0) and np.all(hiddens[2].numpy() >= 0)
    assert np.any(output.numpy() < 0)
    linear = ProjectionHead("linear", out_dim=8)
    assert [(l.name, l.units, l.use_bias, l.use_bn) for l in linear.linear_layers] == [
        ("l_0", 8, False, True)
    ]
    none_head = ProjectionHead("none")
    out, _ = none_head(x)
    np.testing.assert_array_equal(out, x)
    assert not none_head.weights


@pytest.mark.parametrize(
    "mode,num_layers,selector",
    [("nonlinear", 3, 4), ("nonlinear", 3, -5), ("linear", 3, 2), ("none", 3, 1)],
)
def test_projection_head_rejects_bad_selector(mode, num_layers, selector):
    with pytest.raises(ValueError, match="ft_proj_selector"):
        ProjectionHead(mode, num_layers=num_layers, ft_proj_selector=selector)


def test_projection_head_rejects_bad_mode_and_depth():
    with pytest.raises(ValueError, match="proj_head_mode"):
        ProjectionHead("mlp")
    with pytest.raises(ValueError, match="num_proj_layers"):
        ProjectionHead("nonlinear", num_layers=0)


def test_supervised_head():
    head = SupervisedHead(5)
    logits = head(_features(), training=True)
    assert head.name == "head_supervised"
    assert logits.shape == (4, 5)
    assert sorted(v.path for v in head.weights) == [
        "head_supervised/linear_layer/dense/bias",
        "head_supervised/linear_layer/dense/kernel",
    ]
    zero = SupervisedHead(5, zero_init=True)
    np.testing.assert_array_equal(zero(_features()).numpy(), 0.0)
    with pytest.raises(ValueError, match="num_classes"):
        SupervisedHead(0)


@pytest.mark.parametrize(
    "layer",
    [
        LinearLayer(None, use_bias=True, use_bn=True, zero_init=True, batch_norm_decay=0.8, global_bn=True),
        ProjectionHead("nonlinear", out_dim=6, num_layers=2, ft_proj_selector=-1, batch_norm_decay=0.7),
        ProjectionHead("linear", out_dim=6, ft_proj_selector=1),
        SupervisedHead(3, zero_init=True),
    ],
    ids=["linear_layer", "nonlinear_head", "linear_head", "supervised_head"],
)
def test_head_config_round_trip(layer):
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"simclr_tf>{type(layer).__name__}"
    clone = keras.saving.deserialize_keras_object(serialized)
    assert clone.get_config() == layer.get_config()
    x = _features(n=6)
    layer.build(x.shape)
    clone.build(x.shape)
    rng = np.random.RandomState(0)
    for v in layer.weights:
        v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32"))
    clone.set_weights(layer.get_weights())
    for a, b in zip(keras.tree.flatten(layer(x)), keras.tree.flatten(clone(x))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_linear_layer_frozen_before_build_stays_frozen():
    # Its dense and BN are created in build(), after the freeze.
    layer = LinearLayer(4, use_bn=True)
    layer.trainable = False
    layer(_features(), training=True)
    assert not layer.trainable_weights
    assert not any(v.trainable for v in layer.weights)
    np.testing.assert_array_equal(layer.batch_norm.bn.moving_mean.numpy(), 0.0)  # inference-mode BN
