"""--precision and --jit_compile: a real pretraining step in each mode stays finite.

Mixed precision must really compute in the low dtype (the model's outputs are bf16 or
f16), keep float32 variables, and keep the losses in float32; from the same weights
and batch its loss must be close to float32's.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.models import SimCLRModel
from simclr_tf.train import train_and_evaluate
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment

BATCH = 8


def tiny_config(precision: str = "float32", jit_compile: bool = False) -> Config:
    return Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 2},
        data={"dataset": "mnist5k", "train_split": "train[:64]", "eval_split": "validation[:32]"},
        optim={"warmup_epochs": 0},
        train={"mode": "train", "train_steps": 2, "train_batch_size": BATCH, "eval_batch_size": 16,
               "log_every_steps": 1, "checkpoint_steps": 2},
        runtime={"precision": precision, "jit_compile": jit_compile},
    )


@pytest.fixture(scope="module")
def batch():
    experiment = Experiment.create(tiny_config(), "unused_model_dir_never_written")
    return next(iter(experiment.replica_train_dataset(BATCH)))


@pytest.fixture(scope="module")
def float32_reference(tmp_path_factory, batch):
    """Initial weights and the first step's loss in float32 (eagerly: a reference, not under test)."""
    state, metrics = _one_step(tiny_config(), tmp_path_factory.mktemp("f32"), batch, traced=False)
    return state.initial_weights, float(metrics["total_loss"])


def _one_step(config, model_dir, batch, weights=None, traced=True):
    experiment = Experiment.create(config, str(model_dir))
    state = trainer.build_train_state(experiment)
    if weights is not None:
        state.model.set_weights(weights)
    state.initial_weights = state.model.get_weights()
    step_fn = trainer.make_train_step(experiment, state)
    step_fn = tf.function(step_fn) if traced else step_fn
    metrics = step_fn(batch)
    # Dynamic loss scaling starts high (2**15) and skips steps whose float16 gradients
    # overflow, halving the scale each time, until one is applied.
    for _ in range(20):
        if int(state.optimizer.iterations.numpy()):
            break
        metrics = step_fn(batch)
    return state, metrics


@pytest.mark.parametrize(
    "precision,jit_compile,compute_dtype",
    [
        ("float32", True, "float32"),
        ("mixed_bfloat16", False, "bfloat16"),
        ("mixed_bfloat16", True, "bfloat16"),
        ("mixed_float16", False, "float16"),
    ],
)
def test_a_pretraining_step_in_each_mode(precision, jit_compile, compute_dtype, tmp_path, batch, float32_reference):
    weights, float32_loss = float32_reference
    state, metrics = _one_step(tiny_config(precision, jit_compile), tmp_path, batch, weights)
    model = state.model

    outputs = model(batch["image"][:2], training=False)
    assert outputs["proj_head_output"].dtype == compute_dtype  # the model really runs in it
    assert outputs["logits_sup"].dtype == compute_dtype
    assert {v.dtype for v in model.weights} == {"float32"}
    for name in ("total_loss", "contrast_loss", "contrast_entropy", "supervised_loss", "weight_decay"):
        assert metrics[name].dtype == tf.float32, name
        assert np.isfinite(metrics[name].numpy()), name
    assert bool(metrics["finite"])
    # Same weights, same batch: only rounding differs.
    np.testing.assert_allclose(float(metrics["total_loss"]), float32_loss, rtol=2e-2)
    assert int(state.optimizer.iterations.numpy()) == 1
    moved = [not np.array_equal(v.numpy(), w) for v, w in zip(model.weights, state.initial_weights)]
    assert sum(moved) > len(moved) // 2
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    if precision == "mixed_float16":
        assert isinstance(state.optimizer, keras.optimizers.LossScaleOptimizer)
        assert 1 <= float(state.optimizer.dynamic_scale.numpy()) <= 2**15
    else:
        assert not isinstance(state.optimizer, keras.optimizers.LossScaleOptimizer)


def test_the_policy_reaches_every_layer_and_round_trips():
    model = SimCLRModel(10, resnet_depth=10, width_multiplier=0.25, cifar_stem=True, num_proj_layers=2,
                        dtype="mixed_bfloat16")
    model.build((None, 16, 16, 3))
    layers = model._flatten_layers(include_self=False)
    assert {layer.dtype_policy.name for layer in layers} == {"mixed_bfloat16"}
    clone = SimCLRModel.from_config(model.get_config())
    clone.build((None, 16, 16, 3))
    assert {layer.dtype_policy.name for layer in clone._flatten_layers()} == {"mixed_bfloat16"}
    # The default stays float32: nothing global was changed.
    assert keras.config.dtype_policy().name == "float32"
    assert SimCLRModel(None, resnet_depth=18, width_multiplier=0.25).dtype_policy.name == "float32"
    with pytest.raises(ValueError, match="float32 variables"):
        SimCLRModel(None, resnet_depth=18, width_multiplier=0.25, dtype="bfloat16")


def test_mixed_bfloat16_run_trains_evaluates_and_resumes(tmp_path):
    config = tiny_config("mixed_bfloat16").replace(train={"mode": "train_then_eval", "knn_eval": True})
    result = train_and_evaluate(config, str(tmp_path))
    assert result["global_step"] == 2
    assert 0.0 <= result["eval/label_top_1_accuracy"] <= 1.0 and 0.0 <= result["eval/knn_top_1_accuracy"] <= 1.0
    state = trainer.build_train_state(Experiment.create(config.replace(train={"train_steps": 3}), str(tmp_path)))
    assert state.restore_report.source == "model_dir"


@pytest.mark.slow
def test_jit_compiled_step_runs_inside_the_training_loop(tmp_path):
    # The compiled step is called through strategy.run inside the loop's tf.function,
    # which traces it differently from a direct call.
    config = tiny_config("float32", jit_compile=True)
    result = train_and_evaluate(config.replace(train={"mode": "train_then_eval"}), str(tmp_path))
    assert result["global_step"] == 2
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
