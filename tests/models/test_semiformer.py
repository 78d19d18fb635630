"""Semiformer's two-branch model: outputs, saving, parameter count, coupling, restoring a ResNet."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import keras
import tensorflow as tf

from simclr_tf import models
from simclr_tf.config import ModelConfig
from simclr_tf.models import semiformer as semiformer_lib
from simclr_tf.models import vit as vit_lib
from simclr_tf.models.resnet import ResNet
from simclr_tf.models.semiformer import SemiformerModel
from simclr_tf.models.vit import VIT_SIZES, VisionTransformer
from simclr_tf.train import checkpoints

MICRO = vit_lib.VitSize(hidden_dim=16, num_layers=4, num_heads=2, mlp_dim=32)
CLASSES = 3
# ResNet-10 x0.25 at 16 px (CIFAR stem: maps of 16, 8, 4, 2) and 4x4 patches of 4 px.
RESNET = dict(resnet_depth=10, width_multiplier=0.25, cifar_stem=True)


@pytest.fixture
def micro_vit(monkeypatch):
    monkeypatch.setitem(VIT_SIZES, "tiny", MICRO)


def _model(**kwargs) -> SemiformerModel:
    model = SemiformerModel(CLASSES, **RESNET, vit_size="tiny", patch_size=4, **kwargs)
    model.build((None, 16, 16, 3))
    return model


def _images(seed: int = 0, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, 16, 16, 3)).astype("float32")


def _num_params(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def test_outputs_are_named_shaped_and_the_fused_logits_are_the_mean(micro_vit):
    out = _model(zero_init_fusion=False)(_images(), training=True)
    for k, side in enumerate((16, 8, 4, 2), start=1):
        assert out[f"block_group{k}"].shape == (2, side, side, 16 * 2 ** (k - 1))
        assert out[f"transformer_block_group{k}"].shape == (2, 17, 16)  # class token + 4 x 4 patches
    assert out["final_avg_pool"].shape == (2, 128) and out["final_avg_pool_transformer"].shape == (2, 16)
    for name in ("logits_sup", "logits_sup_conv", "logits_sup_transformer"):
        assert out[name].shape == (2, CLASSES)
    np.testing.assert_allclose(
        out["logits_sup"].numpy(), (out["logits_sup_conv"].numpy() + out["logits_sup_transformer"].numpy()) / 2,
        rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["final_avg_pool"].numpy(), out["block_group4"].numpy().mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)


def test_get_config_round_trip_and_keras_save_load_give_the_same_outputs(micro_vit, tmp_path):
    model = _model(zero_init_fusion=False, vit_pooling="mean", stochastic_depth_rate=0.1)
    images = _images(1)
    expected = model(images)
    clone = SemiformerModel.from_config(model.get_config())
    clone.build((None, 16, 16, 3))
    assert clone.get_config() == model.get_config()
    arguments = set(inspect.signature(SemiformerModel.__init__).parameters) - {"self", "name", "kwargs"}
    assert arguments <= set(model.get_config())  # each argument, initialisers' too
    assert [v.path for v in clone.weights] == [v.path for v in model.weights]
    path = str(tmp_path / "semiformer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SemiformerModel) and loaded.transformer.pooling == "mean"
    assert "final_avg_pool_transformer" in expected and len(loaded(images)) == len(expected)
    for key, value in loaded(images).items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_parameter_count_is_resnet_plus_vit_plus_fusion_plus_heads(micro_vit):
    model = _model()
    resnet = ResNet(**RESNET)
    resnet.build((None, 16, 16, 3))
    vit = VisionTransformer(MICRO.hidden_dim, MICRO.num_layers, MICRO.num_heads, MICRO.mlp_dim, patch_size=4)
    vit.build((None, 16, 16, 3))
    d, channels, features = MICRO.hidden_dim, (16, 32, 64, 128), 128
    # conv -> transformer: 1x1 conv with bias, LayerNorm (scale, offset); transformer ->
    # conv: 1x1 conv without bias, BatchNorm (scale, offset, moving mean and variance).
    fusion = sum((c * d + d) + 2 * d + d * c + 4 * c for c in channels)
    heads = (features + 1) * CLASSES + (d + 1) * CLASSES
    assert _num_params(model.weights) == _num_params(resnet.weights) + _num_params(vit.weights) + fusion + heads
    fusion_layers = [*model.conv_to_transformer, *model.transformer_to_conv]
    assert _num_params([w for layer in fusion_layers for w in layer.weights]) == fusion


def test_fusion_couples_the_branches_both_ways(micro_vit):
    model = _model(zero_init_fusion=False)
    images = _images(2)
    before = model(images)
    # (Not a residual branch's: their last BN starts at zero, so they start unused.)
    conv_kernel = model.backbone.stem.stem_layers[0].conv2d.kernel
    conv_kernel.assign(conv_kernel * 1.5)
    after_conv = model(images)
    assert np.abs(after_conv["logits_sup_transformer"].numpy() - before["logits_sup_transformer"].numpy()).max() > 1e-4
    mlp = model.transformer.blocks[0].mlp_in.kernel
    mlp.assign(mlp * 1.5)
    after_vit = model(images)
    assert np.abs(after_vit["logits_sup_conv"].numpy() - after_conv["logits_sup_conv"].numpy()).max() > 1e-4


def test_zero_initialised_fusion_starts_each_branch_alone_and_a_resnet_checkpoint_restores_into_the_conv_branch(
    micro_vit, tmp_path
):
    config = ModelConfig(
        resnet_depth=10, width_multiplier=0.25, image_size=16, num_proj_layers=2, ft_proj_selector=1, patch_size=4)
    resnet_model = models.build_model(config, num_classes=CLASSES, drop_unused_projection_layers=True)
    for weight in resnet_model.weights:  # not the initial values: BN statistics, biases included
        weight.assign(np.random.default_rng(3).normal(size=weight.shape).astype("float32") * 0.1 + weight.numpy())
    path = tf.train.Checkpoint(model=resnet_model).write(str(tmp_path / "resnet" / "ckpt"))
    model = semiformer_lib.build_semiformer(config, num_classes=CLASSES)
    match = checkpoints.restore_model_weights(model, path, exact=False)
    assert not match.unused and not match.mismatched
    assert len(match.restored) == len(checkpoints.model_variables_by_path(resnet_model))
    assert {m.split("/")[1] for m in match.missing} == {
        "transformer", "transformer_head", "conv_to_transformer", "transformer_to_conv"}
    images = _images(4)
    for training in (False, True):
        np.testing.assert_allclose(
            model(images, training=training)["logits_sup_conv"].numpy(),
            resnet_model(images, training=training)["logits_sup"].numpy(), rtol=1e-4, atol=1e-5)
    # A ViT's checkpoint does not fit the conv branch: an error, not a partial restore.
    vit_model = models.build_model(dataclasses.replace(config, backbone="vit"), num_classes=CLASSES,
                                   drop_unused_projection_layers=True)
    vit_path = tf.train.Checkpoint(model=vit_model).write(str(tmp_path / "vit" / "ckpt"))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="model/backbone/"):
        checkpoints.restore_model_weights(semiformer_lib.build_semiformer(config, num_classes=CLASSES), vit_path,
                                          exact=False)


def test_sizes_whose_maps_and_grid_do_not_nest_are_refused():
    assert semiformer_lib.conv_map_sides(224, cifar_stem=False) == (56, 28, 14, 7)
    assert semiformer_lib.fusion_problem(224, 16, cifar_stem=False) is None  # 14 x 14 patches
    assert "block_group4" in semiformer_lib.fusion_problem(20, 4, cifar_stem=True)  # maps 20..3, grid 5
    with pytest.raises(ValueError, match="does not divide"):
        SemiformerModel(CLASSES, **RESNET, patch_size=6).build((None, 16, 16, 3))
