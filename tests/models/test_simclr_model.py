"""SimCLRModel: outputs, naming contract, freezing, gradients, serialization, global BN.

Equivalence with the original TF2 model (structure, and outputs with its weights) is
tested with the checkpoint converter, in tests/tools/test_convert_checkpoint.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import ModelConfig
from simclr_tf.models import OUTPUT_KEYS, SimCLRModel, build_model

BN_VARIABLES = {"gamma", "beta", "moving_mean", "moving_variance"}
TINY = dict(resnet_depth=18, width_multiplier=0.25, cifar_stem=True, proj_out_dim=16)


def _images(n=4, size=8, seed=0):
    return np.random.RandomState(seed).uniform(size=(n, size, size, 3)).astype("float32")


def _tiny(num_classes=10, size=8, **kwargs):
    model = SimCLRModel(num_classes, **{**TINY, **kwargs})
    model.build((None, size, size, 3))
    return model


def _randomize(model, seed=0):
    """Distinct weights and BN statistics, so inference differs from initialisation."""
    rng = np.random.RandomState(seed)
    for v in model.weights:
        scale = 0.3 if len(v.shape) > 1 else 1.0  # kernels smaller, to keep activations tame
        v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32") * scale)


def _name(variable):
    return variable.path.split("/")[-1]


def _ids(model, substring):
    return {id(v) for v in model.weights if substring in v.path}


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def test_output_keys_and_head_shapes():
    model = _tiny(num_classes=7)
    outputs = model(_images(), training=True)
    assert list(outputs) == [*OUTPUT_KEYS, "logits_sup"]
    assert outputs["proj_head_output"].shape == (4, 16)
    assert outputs["logits_sup"].shape == (4, 7)
    np.testing.assert_array_equal(outputs["proj_head_input"], outputs["final_avg_pool"])
    assert model.backbone.name == "resnet" and model.projection_head.name == "projection_head"

    headless = _tiny(num_classes=None)
    assert headless.supervised_head is None
    assert list(headless(_images(), training=False)) == list(OUTPUT_KEYS)


@pytest.mark.parametrize(
    "mode,selector,num_dense,sup_width,proj_width",
    [
        ("nonlinear", 0, 3, 128, 16),
        ("nonlinear", 1, 3, 128, 16),
        ("nonlinear", 2, 3, 128, 16),
        ("nonlinear", -1, 3, 16, 16),
        ("linear", 0, 1, 128, 16),
        ("linear", -1, 1, 16, 16),
        ("none", 0, 0, 128, 128),
    ],
)
def test_supervised_head_input_follows_ft_proj_selector(mode, selector, num_dense, sup_width, proj_width):
    model = _tiny(num_classes=3, proj_head_mode=mode, ft_proj_selector=selector)
    outputs = model(_images(), training=False)
    assert len(model.projection_head.linear_layers) == num_dense
    assert outputs["supervised_head_input"].shape == (4, sup_width)
    assert outputs["proj_head_output"].shape == (4, proj_width)
    assert tuple(model.supervised_head.linear_layer.dense.kernel.shape) == (sup_width, 3)


def test_invalid_arguments_name_the_flag():
    for bad in (-2, 5):
        with pytest.raises(ValueError, match="fine_tune_after_block"):
            SimCLRModel(10, fine_tune_after_block=bad)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        SimCLRModel(10, num_proj_layers=2, ft_proj_selector=3)
    with pytest.raises(ValueError, match="num_classes"):
        SimCLRModel(0)


# ---------------------------------------------------------------------------
# Naming contract: other modules select variables by path substrings.
# ---------------------------------------------------------------------------


def test_variable_path_naming_contract():
    model = _tiny(num_classes=10, resnet_depth=50, sk_ratio=0.0625, se_ratio=0.25)
    paths = [v.path for v in model.weights]
    assert len(set(paths)) == len(paths)
    assert paths[0] == "simclr_model/resnet/stem/conv1/conv2d/kernel"
    for v in model.weights:
        # `batch_norm` exactly on BN variables (also matches the original's
        # `batch_normalization` exclusion pattern).
        assert ("batch_norm" in v.path) == (_name(v) in BN_VARIABLES), v.path
        assert ("batch_normalization" in v.path) == (_name(v) in BN_VARIABLES), v.path
        assert _name(v) in BN_VARIABLES | {"kernel", "bias"}, v.path
    assert _ids(model, "head_supervised") == {id(v) for v in model.supervised_head.weights}
    assert _ids(model, "projection_head") == {id(v) for v in model.projection_head.weights}
    assert _ids(model, "/resnet/") == {id(v) for v in model.backbone.weights}
    for i, group in enumerate(model.backbone.block_groups, start=1):
        assert group.name == f"block_group{i}"
        assert _ids(model, f"block_group{i}/") == {id(v) for v in group.weights}
    # Biases: the supervised head's dense and the SE convs; nothing else.
    biases = [v.path for v in model.weights if _name(v) == "bias"]
    assert "simclr_model/head_supervised/linear_layer/dense/bias" in biases
    assert all("head_supervised" in p or "/se_layer/" in p for p in biases)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert "batch_norm" in layer.name


# ---------------------------------------------------------------------------
# Freezing and gradients
# ---------------------------------------------------------------------------

PARTS = ["stem", "block_group1", "block_group2", "block_group3", "block_group4"]


@pytest.mark.parametrize("fine_tune_after_block", [-1, 0, 1, 2, 3, 4])
def test_trainable_variables_per_fine_tune_after_block(fine_tune_after_block):
    # With SE: its expand conv is created in build(), after the freeze in __init__.
    model = _tiny(fine_tune_after_block=fine_tune_after_block, se_ratio=0.25)
    trainable = {v.path for v in model.trainable_variables}
    frozen_parts = PARTS[: fine_tune_after_block + 1]
    for part in PARTS:
        in_part = {v.path for v in model.weights if f"/resnet/{part}/" in v.path and v.trainable}
        part_weights = [v for v in model.weights if f"/resnet/{part}/" in v.path]
        if part in frozen_parts:
            assert not any(f"/resnet/{part}/" in p for p in trainable), part
            assert not any(v.trainable for v in part_weights)
        else:
            assert in_part and in_part <= trainable, part
    # The heads always train.
    head_weights = model.projection_head.trainable_weights + model.supervised_head.trainable_weights
    heads = {v.path for v in head_weights}
    assert heads and heads <= trainable
    assert {v.path for v in model.trainable_weights} == trainable


def test_frozen_backbone_keeps_bn_statistics_in_training_mode():
    model = _tiny(fine_tune_after_block=4)
    moving = [v for v in model.weights if "moving_" in v.path]
    before = {v.path: v.numpy().copy() for v in moving}
    model(_images(), training=True)
    for v in moving:
        if "/resnet/" in v.path:
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    head_moving = [v for v in moving if "projection_head" in v.path]
    # The projection head's BN did run in training mode.
    assert any(not np.allclose(v.numpy(), before[v.path]) for v in head_moving)


@pytest.mark.parametrize("fine_tune_after_block", [0, 2])
def test_no_gradient_reaches_frozen_parts(fine_tune_after_block):
    model = _tiny(fine_tune_after_block=fine_tune_after_block)
    kernels = [v for v in model.weights if "/resnet/" in v.path and _name(v) == "kernel"]
    x = tf.constant(_images())
    with tf.GradientTape() as tape:
        outputs = model(x, training=True)
        loss = tf.reduce_sum(outputs["proj_head_output"] ** 2) + tf.reduce_sum(outputs["logits_sup"])
    grads = tape.gradient(loss, [v.value for v in kernels])
    frozen = PARTS[: fine_tune_after_block + 1]
    for v, g in zip(kernels, grads):
        is_frozen = any(f"/resnet/{p}/" in v.path for p in frozen)
        if is_frozen:
            assert g is None, v.path
    # Trainable parts are connected (convs feeding a zero-initialised BN gamma get exact zeros).
    trainable_grads = [g for v, g in zip(kernels, grads) if "block_group4" in v.path]
    assert all(g is not None for g in trainable_grads)
    assert any(np.any(g.numpy() != 0) for g in trainable_grads)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_to_supervised_head(stop_gradient):
    model = _tiny(stop_gradient_to_supervised_head=stop_gradient, ft_proj_selector=1)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(tf.constant(_images()), training=True)["logits_sup"]
        loss = tf.reduce_sum(logits * tf.range(10, dtype=tf.float32))
    grads = dict(zip([v.path for v in variables], tape.gradient(loss, [v.value for v in variables])))

    def nonzero(g):
        return g is not None and np.any(g.numpy() != 0)

    upstream = [p for p in grads if "/resnet/" in p or "projection_head" in p]
    if stop_gradient:
        assert not any(nonzero(grads[p]) for p in upstream)
    else:
        assert any(nonzero(grads[p]) for p in upstream if "/resnet/" in p)
    assert all(nonzero(g) for p, g in grads.items() if "head_supervised" in p)


# ---------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------

ROUND_TRIP_KWARGS = dict(
    resnet_depth=50,
    width_multiplier=0.25,
    sk_ratio=0.0625,
    se_ratio=0.25,
    cifar_stem=False,
    batch_norm_decay=0.95,
    proj_head_mode="nonlinear",
    proj_out_dim=8,
    num_proj_layers=2,
    ft_proj_selector=1,
    stop_gradient_to_supervised_head=True,
    fine_tune_after_block=2,
    zero_init_logits_layer=True,
)


def test_model_config_round_trip():
    model = SimCLRModel(5, **ROUND_TRIP_KWARGS)
    config = model.get_config()
    for key, value in {"num_classes": 5, **ROUND_TRIP_KWARGS}.items():
        assert config[key] == value, key
    clone = SimCLRModel.from_config(config)
    assert clone.get_config() == config
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(clone, SimCLRModel) and clone.get_config() == config


def test_keras_file_round_trip(tmp_path):
    model = SimCLRModel(5, **ROUND_TRIP_KWARGS)
    model.build((None, 16, 16, 3))
    _randomize(model)
    x = _images(size=16)
    expected = model(x, training=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SimCLRModel)
    actual = loaded(x, training=False)
    assert list(actual) == list(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert [v.path for v in loaded.trainable_variables] == [v.path for v in model.trainable_variables]


@pytest.mark.parametrize("kwargs", [{}, {"resnet_depth": 50, "sk_ratio": 0.0625, "se_ratio": 0.25}])
def test_tf_checkpoint_holds_every_weight(tmp_path, kwargs):
    # tf.train.Checkpoint silently skips layers kept in Keras' TrackedList attributes.
    model = _tiny(**kwargs)
    _randomize(model)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    stored = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map() if k.startswith("model/")]
    assert len(stored) == len(model.weights)

    restored = _tiny(**kwargs)
    tf.train.Checkpoint(model=restored).restore(path).assert_consumed()
    for saved, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy(), err_msg=saved.path)


# ---------------------------------------------------------------------------
# build_model and global BN
# ---------------------------------------------------------------------------


def test_build_model_from_config():
    config = ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=16, proj_out_dim=8,
                         ft_proj_selector=-1, fine_tune_after_block=1, global_bn=True)
    model = build_model(config, num_classes=4, stop_gradient_to_supervised_head=True)
    assert model.built and model.cifar_stem and model.global_bn
    assert model.stop_gradient_to_supervised_head and model.fine_tune_after_block == 1
    assert model(_images(size=16))["logits_sup"].shape == (4, 4)
    bn = model.backbone.stem.stem_layers[1].bn
    assert bn.synchronized
    assert not build_model(config, num_classes=None, global_bn=False).global_bn
    imagenet = build_model(ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=64), num_classes=None)
    assert not imagenet.cifar_stem and imagenet.supervised_head is None


def _train_step_moving_stats(model, images, strategy=None):
    """BN moving statistics after one training-mode forward pass."""
    if strategy is None:
        model(images, training=True)
    else:
        per_replica = len(images) // strategy.num_replicas_in_sync
        dist = strategy.experimental_distribute_values_from_function(
            lambda ctx: images[ctx.replica_id_in_sync_group * per_replica:][:per_replica]
        )
        def step(batch):
            return strategy.run(lambda t: model(t, training=True)["proj_head_output"], args=(batch,))

        tf.function(step)(dist)
    return {v.path: v.numpy() for v in model.weights if "moving_" in v.path}


@pytest.mark.parametrize("global_bn", [True, False])
def test_global_bn_matches_single_replica_statistics(two_cpu_strategy, global_bn):
    kwargs = dict(resnet_depth=18, width_multiplier=0.25, cifar_stem=True, proj_out_dim=8,
                  num_proj_layers=2, batch_norm_decay=0.5)
    with two_cpu_strategy.scope():
        distributed = SimCLRModel(3, global_bn=global_bn, **kwargs)
        distributed.build((None, 8, 8, 3))
    single = SimCLRModel(3, global_bn=False, **kwargs)
    single.build((None, 8, 8, 3))
    single.set_weights(distributed.get_weights())
    # Replicas see different data (different per-replica statistics).
    images = _images(n=8) * np.linspace(0.5, 2.0, 8, dtype="float32")[:, None, None, None]
    expected = _train_step_moving_stats(single, images)
    actual = _train_step_moving_stats(distributed, images, two_cpu_strategy)
    assert expected.keys() == actual.keys()
    close = [np.allclose(actual[k], expected[k], rtol=1e-4, atol=1e-5) for k in expected]
    if global_bn:
        assert all(close), [k for k, c in zip(expected, close) if not c]
    else:
        assert not all(close)  # per-replica BN differs: the check above can fail


@pytest.mark.parametrize("selector,kept", [(0, 0), (1, 1), (2, 2), (-1, 3), (-2, 2)])
def test_dropping_unused_projection_layers_keeps_the_selected_hidden(selector, kept):
    # Fine-tuning keeps the projection layers below the classifier (the paper's recipe).
    full = _tiny(ft_proj_selector=selector, num_proj_layers=3)
    _randomize(full)
    trimmed = _tiny(ft_proj_selector=selector, num_proj_layers=3, drop_unused_projection_layers=True)
    assert len(trimmed.projection_head.linear_layers) == kept
    values = {v.path: v for v in full.weights}
    for v in trimmed.weights:
        v.assign(values[v.path])  # every trimmed variable exists in the full model
    x = _images()
    want = full(x, training=False)
    got = trimmed(x, training=False)
    np.testing.assert_allclose(got["supervised_head_input"], want["supervised_head_input"], rtol=1e-5)
    np.testing.assert_allclose(got["logits_sup"], want["logits_sup"], rtol=1e-5, atol=1e-6)
    # With layers dropped, the projection output is the selected hidden itself.
    np.testing.assert_allclose(got["proj_head_output"], got["supervised_head_input"])
    round_trip = SimCLRModel.from_config(trimmed.get_config())
    assert round_trip.drop_unused_projection_layers and len(round_trip.projection_head.linear_layers) == kept
