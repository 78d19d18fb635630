"""The ViT backbone (`--backbone=vit`): sizes, outputs, saving, noise, freezing, AdamW, runs."""

from __future__ import annotations

import numpy as np
import pytest
import keras
import tensorflow as tf

from simclr_tf import losses, models
from simclr_tf.config import Config, FlagError, ModelConfig, validate
from simclr_tf.models import vit as vit_lib
from simclr_tf.models.vit import VIT_SIZES, VisionTransformer
from simclr_tf.optim import factory
from simclr_tf.train import train_and_evaluate

# Backbone parameters at 224 px, patch 16, class token: the ViT paper's ViT-B/16 (86M with
# the 1000-class head) and DeiT's Ti and S, as timm counts them (86,567,656, 5,717,416 and
# 22,050,664 with the head, 1000 * (D + 1) of it).
# Test runs' `--vit_size=tiny`: 4 blocks of width 16.
MICRO = vit_lib.VitSize(hidden_dim=16, num_layers=4, num_heads=2, mlp_dim=32)
PAPER_PARAMS = {"tiny": 5_717_416 - 193_000, "small": 22_050_664 - 385_000, "base": 86_567_656 - 769_000}


@pytest.mark.parametrize("size", sorted(VIT_SIZES))
def test_parameter_counts_match_the_papers_and_outputs_have_the_ones_shapes(size):
    counts = models.parameter_counts(224, backbone="vit", vit_size=size, patch_size=16)
    assert counts["backbone"] == PAPER_PARAMS[size]
    assert counts["patch_embedding"] + counts["encoder_blocks"] + 2 * VIT_SIZES[size].hidden_dim == counts["backbone"]
    dim = VIT_SIZES[size].hidden_dim
    shapes = VisionTransformer(dim, 12, VIT_SIZES[size].num_heads, VIT_SIZES[size].mlp_dim, patch_size=16) \
        .compute_output_shape((None, 224, 224, 3))
    assert shapes["patch_embedding"] == shapes["block_group4"] == (None, 197, dim)
    assert shapes["final_avg_pool"] == (None, dim)


def test_mean_pooling_has_no_class_token_and_averages_the_final_tokens():
    vit = VisionTransformer(16, 4, 2, 32, patch_size=4, pooling="mean")
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype("float32")
    outputs = vit(images)
    assert outputs["patch_embedding"].shape == (3, 4, 16)  # 2 x 2 patches, no token
    final = vit.final_norm(outputs["block_group4"]).numpy()
    np.testing.assert_allclose(outputs["final_avg_pool"].numpy(), final.mean(axis=1), rtol=1e-5, atol=1e-6)
    token = VisionTransformer(16, 4, 2, 32, patch_size=4, pooling="token")
    token_outputs = token(images)
    assert token_outputs["patch_embedding"].shape == (3, 5, 16)
    np.testing.assert_allclose(
        token_outputs["final_avg_pool"].numpy(), token.final_norm(token_outputs["block_group4"]).numpy()[:, 0],
        rtol=1e-5, atol=1e-6)


def test_group_outputs_follow_the_quarters_of_the_blocks():
    vit = VisionTransformer(16, 8, 2, 32, patch_size=4)
    assert vit.group_ends == (2, 4, 6, 8)
    images = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype("float32")
    outputs = vit(images)
    x = outputs["patch_embedding"]
    for i, block in enumerate(vit.blocks, start=1):
        x = block(x)
        if i % 2 == 0:
            np.testing.assert_allclose(outputs[f"block_group{i // 2}"].numpy(), x.numpy(), rtol=1e-5, atol=1e-5)


def test_a_vit_simclr_model_survives_get_config_and_keras_save_load(tmp_path, monkeypatch):
    monkeypatch.setitem(VIT_SIZES, "tiny", MICRO)
    config = ModelConfig(backbone="vit", vit_size="tiny", patch_size=4, image_size=16, num_proj_layers=2,
                         proj_out_dim=8, vit_pooling="mean", stochastic_depth_rate=0.2)
    model = models.build_model(config, num_classes=3)
    images = np.random.default_rng(2).uniform(size=(2, 16, 16, 3)).astype("float32")
    expected = model(images)
    clone = type(model).from_config(model.get_config())
    clone.build((None, 16, 16, 3))
    assert clone.get_config() == model.get_config()
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
    path = str(tmp_path / "vit.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.backbone, VisionTransformer) and loaded.backbone.pooling == "mean"
    for key, value in loaded(images).items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_stochastic_depth_is_the_identity_at_inference_and_drops_whole_examples_in_training():
    block = vit_lib.EncoderBlock(8, 2, 16, drop_path_rate=0.5)
    tokens = np.random.default_rng(3).normal(size=(64, 3, 8)).astype("float32")
    plain = vit_lib.EncoderBlock(8, 2, 16)
    plain.build(tokens.shape)
    block.build(tokens.shape)
    block.set_weights(plain.get_weights())
    np.testing.assert_allclose(block(tokens, training=False).numpy(), plain(tokens).numpy(), rtol=1e-6)
    # Training: each example's attention branch is kept (x2) or dropped whole.
    attention_branch = block.attention(block.layer_norm_1(tokens), block.layer_norm_1(tokens)).numpy()
    dropped = block.drop_attention(attention_branch, training=True).numpy()
    per_example = [np.allclose(d, 0) or np.allclose(d, 2 * a, rtol=1e-5) for d, a in zip(dropped, attention_branch)]
    assert all(per_example)
    kept = [not np.allclose(d, 0) for d in dropped]
    assert 10 < sum(kept) < 54
    rates = [b.drop_path_rate for b in VisionTransformer(8, 4, 2, 16, patch_size=4, stochastic_depth_rate=0.2).blocks]
    np.testing.assert_allclose(rates, [0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize("after_block, frozen_blocks", [(-1, 0), (0, 0), (2, 4), (4, 8)])
def test_fine_tune_after_block_freezes_the_embedding_and_quarters_of_the_blocks(after_block, frozen_blocks):
    vit = VisionTransformer(8, 8, 2, 16, patch_size=4, fine_tune_after_block=after_block)
    vit.build((None, 8, 8, 3))
    assert vit.patch_embedding.trainable == (after_block < 0)
    assert [b.trainable for b in vit.blocks] == [i >= frozen_blocks for i in range(8)]
    assert vit.final_norm.trainable == (after_block < 4)
    images = tf.random.uniform((2, 8, 8, 3), seed=4)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(vit(images, training=True)["final_avg_pool"] ** 2)
    trainable = vit.trainable_variables
    gradients = tape.gradient(loss, trainable)
    # Every trained variable gets a gradient; the key bias's is zero in exact arithmetic
    # (it shifts a query's logits over all keys alike, which the softmax ignores).
    assert all(g is not None for g in gradients)
    assert all(np.any(g.numpy()) for g, v in zip(gradients, trainable) if "key/bias" not in v.path)
    assert len(trainable) == 0 if after_block == 4 else len(trainable) > 0


def test_adamw_decays_kernels_in_the_optimizer_and_nothing_through_the_loss():
    model = models.build_model(ModelConfig(backbone="vit", vit_size="tiny", patch_size=8, image_size=16,
                                           num_proj_layers=1), num_classes=2)
    assert losses.variables_with_loss_weight_decay(model.trainable_variables, "adamw") == []
    decayed = {v.path for v in losses.variables_with_loss_weight_decay(model.trainable_variables, "momentum")}
    assert not any(p in path for path in decayed for p in ("layer_norm", "position_embedding", "class_token"))
    assert "simclr_model/vit/block1/mlp_in/kernel" in decayed

    optimizer = factory.build_optimizer("adamw", learning_rate=0.1, weight_decay=0.5)
    variables = model.trainable_variables
    before = {v.path: v.numpy().copy() for v in variables}
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    for variable in variables:
        leaf = variable.path.rsplit("/", 1)[-1]
        scale = 1.0 if leaf in factory.ADAMW_EXCLUDE_LEAVES else 1 - 0.1 * 0.5
        np.testing.assert_allclose(variable.numpy(), before[variable.path] * scale, rtol=1e-6, err_msg=variable.path)


@pytest.mark.parametrize("flags, flag", [
    ({"patch_size": 5}, "--patch_size"),
    ({"sk_ratio": 0.0625}, "--sk_ratio"),
    ({"vit_size": "huge"}, "--vit_size"),
    ({"vit_pooling": "max"}, "--vit_pooling"),
    ({"backbone": "convnext"}, "--backbone"),
])
def test_bad_vit_flags_name_the_flag(flags, flag):
    config = Config.demo().replace(model={"backbone": "vit", "image_size": 32, "patch_size": 4, **flags})
    with pytest.raises(FlagError, match=flag):
        validate(config)


def test_the_original_checkpoint_format_refuses_a_vit():
    from simclr_tf import convert

    model = models.build_model(ModelConfig(backbone="vit", patch_size=8, image_size=16, num_proj_layers=1), num_classes=None)
    with pytest.raises(ValueError, match="--backbone=resnet"):
        convert.original_layout(model)


VIT_MODEL = {"backbone": "vit", "vit_size": "tiny", "patch_size": 4}
ADAMW = {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.05}


@pytest.fixture(scope="module")
def micro_vit():
    """`--vit_size=tiny` as 4 blocks of width 16, so a ViT run takes seconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VIT_SIZES, "tiny", MICRO)
        yield


@pytest.fixture(scope="module")
def vit_pretrained(micro_vit, tiny_method_config, tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.mktemp("vit_pretrain"))
    train_and_evaluate(tiny_method_config("pretrain").replace(model=VIT_MODEL, optim=ADAMW), model_dir)
    return model_dir


@pytest.mark.parametrize("train_mode", ["finetune", "distill", "fixmatch"])
def test_the_recipe_runs_on_a_vit(train_mode, vit_pretrained, tiny_method_config, tmp_path):
    """Pretrain (the fixture), then a step of finetune (evaluated and exported), distill and
    fixmatch (the semi-supervised modes share its model and batches)."""
    evaluated = train_mode == "finetune"
    config = tiny_method_config(train_mode).replace(
        model=VIT_MODEL, optim=ADAMW, semi={"unlabeled_batch_ratio": 1},
        train={"checkpoint": vit_pretrained, "mode": "train_then_eval" if evaluated else "train",
               "keep_hub_module_max": int(evaluated)})
    if train_mode == "distill":
        config = config.replace(distill={"teacher_checkpoint": vit_pretrained})
    result = train_and_evaluate(config, str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")
    if evaluated:
        assert result["global_step"] == 1 and 0 <= result["eval/label_top_1_accuracy"] <= 1
        # The export holds the ViT, at the training image size.
        loaded = tf.saved_model.load(str(tmp_path / "saved_model" / "1"))
        outputs = loaded(tf.zeros((2, 16, 16, 3)), trainable=False)
        assert outputs["patch_embedding"].shape == (2, 17, 16) and outputs["final_avg_pool"].shape == (2, 16)
