"""SavedModel export (simclr_tf/export.py): named outputs in both modes, serving signature,
every weight trainable so a loaded export fine-tunes end to end, keep_hub_module_max,
atomic writes, and the export at the end of a training run."""

import os

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import export
from simclr_tf.config import Config
from simclr_tf.models import SimCLRModel, build_model
from simclr_tf.train import checkpoints, train_and_evaluate


LR = 0.002  # plain SGD on distinct (large) random weights
TINY = dict(resnet_depth=10, width_multiplier=0.25, cifar_stem=True, proj_out_dim=8, num_proj_layers=2)


def _images(n=6, size=16, seed=0):
    return np.random.RandomState(seed).uniform(size=(n, size, size, 3)).astype("float32")


def _randomized_model(**kwargs):
    model = SimCLRModel(4, **{**TINY, **kwargs})
    model.build((None, 16, 16, 3))
    rng = np.random.RandomState(0)
    for v in model.weights:
        scale = 0.3 if len(v.shape) > 1 else 1.0
        v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32") * scale)
    return model


def _assert_outputs_close(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # Frozen blocks and a stop-gradient, as a pretraining or linear-eval run has them: the
    # export must not keep either.
    model = _randomized_model(fine_tune_after_block=2, stop_gradient_to_supervised_head=True)
    model_dir = str(tmp_path_factory.mktemp("export"))
    path = export.export_step(model, model_dir, 3, keep_max=1)
    assert path == os.path.join(model_dir, "saved_model", "3")
    return model, tf.saved_model.load(path)


def test_loaded_export_gives_the_models_named_outputs(exported):
    model, loaded = exported
    x = _images()
    expected = model(x, training=False)
    _assert_outputs_close(loaded(x, trainable=False), expected)
    _assert_outputs_close(loaded.signatures["serving_default"](images=tf.constant(x)), expected)
    assert {"initial_conv", "block_group4", "final_avg_pool", "proj_head_output", "logits_sup"} <= set(expected)
    # trainable=True: batch statistics, the same names, and the moving averages move.
    moving = [v for v in loaded.non_trainable_variables if "moving_mean" in v.name]
    before = [v.numpy().copy() for v in moving]
    training = loaded(x, trainable=True)
    assert sorted(training) == sorted(expected)
    assert not np.allclose(training["final_avg_pool"], expected["final_avg_pool"])
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, moving))
    # 32 x 32 inputs work too (any spatial size).
    assert loaded(_images(n=2, size=32), trainable=False)["logits_sup"].shape == (2, 4)


def test_loaded_export_fine_tunes_every_weight_with_a_gradient_tape(exported):
    model, loaded = exported
    # Every weight that trains when nothing is frozen, though the model had frozen blocks.
    unfrozen = SimCLRModel(4, **TINY)
    unfrozen.build((None, 16, 16, 3))
    assert len(loaded.trainable_variables) == len(unfrozen.trainable_weights) > len(model.trainable_weights)
    assert len(loaded.variables) == len(model.weights)
    x, labels = tf.constant(_images()), tf.constant([0, 1, 2, 3, 0, 1])

    def cross_entropy(logits):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    variables = loaded.trainable_variables
    start = {v.name: v.numpy().copy() for v in variables}
    losses = []
    for _ in range(5):
        with tf.GradientTape() as tape:
            outputs = loaded(x, trainable=True)
            # The classifier, and a classification of the projection output: every weight counts.
            loss = cross_entropy(outputs["logits_sup"]) + cross_entropy(outputs["proj_head_output"][:, :4])
        grads = tape.gradient(loss, variables)
        zero = [v.name for v, g in zip(variables, grads) if g is None or not np.any(g.numpy())]
        assert not zero, zero  # a real gradient for every weight
        for variable, grad in zip(variables, grads):  # plain SGD, no Keras
            variable.assign_sub(LR * grad)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for part in ("stem", *(f"block_group{i}" for i in range(1, 5)), "projection_head", "head_supervised"):
        changed = [not np.array_equal(start[v.name], v.numpy()) for v in variables if f"/{part}/" in v.name]
        # Some updates are below float32 resolution (gradients ~1e-6 on weights ~0.5).
        assert changed and np.mean(changed) > 0.9, part


def test_a_model_with_dropout_and_stochastic_depth_exports_and_drops_only_in_training(tmp_path):
    # Their seed states are read by the training-mode signature: an export without them failed.
    model = _randomized_model(dropout_rate=0.5, stochastic_depth_rate=0.5)
    loaded = tf.saved_model.load(export.export_step(model, str(tmp_path), 1, keep_max=1))
    images = tf.constant(_images())
    inference = loaded(images, trainable=False)
    _assert_outputs_close({k: v.numpy() for k, v in inference.items()},
                          {k: v.numpy() for k, v in model(images, training=False).items()})
    first, second = (loaded(images, trainable=True)["logits_sup"].numpy() for _ in range(2))
    assert not np.allclose(first, inference["logits_sup"].numpy()) and not np.allclose(first, second)


def test_keep_hub_module_max_keeps_the_newest(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(export, "write_saved_model", lambda model, path: written.append(path) or os.makedirs(path))
    for step in (10, 20, 30):
        export.export_step(None, str(tmp_path), step, keep_max=2)
    os.makedirs(tmp_path / "saved_model" / ".tmp-40-abc")  # an interrupted export is not counted
    assert export.exported_steps(str(tmp_path)) == [20, 30]
    assert export.export_step(None, str(tmp_path), 50, keep_max=0) is None  # 0: no export
    assert len(written) == 3 and export.exported_steps(str(tmp_path)) == [20, 30]


def test_a_failed_export_leaves_the_previous_one_and_no_partial_directory(tmp_path, monkeypatch):
    model = _randomized_model()
    (tmp_path / "saved_model" / "5").mkdir(parents=True)

    def fail(module, path, **kwargs):
        os.makedirs(os.path.join(path, "variables"))  # half written
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_step(model, str(tmp_path), 6, keep_max=1)
    assert os.listdir(tmp_path / "saved_model") == ["5"]


def test_training_run_exports_its_final_model(tmp_path):
    config = Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 32, "proj_out_dim": 8},
        data={"dataset": "mnist5k", "train_split": "train[:32]"},
        train={"mode": "train", "train_steps": 2, "train_batch_size": 16, "keep_hub_module_max": 1},
    )
    train_and_evaluate(config, str(tmp_path))
    assert export.exported_steps(str(tmp_path)) == [2]
    model = build_model(config.model, num_classes=10, stop_gradient_to_supervised_head=True, global_bn=False)
    checkpoints.restore_model_weights(model, str(tmp_path / "ckpt-2"), exact=True)
    loaded = tf.saved_model.load(str(tmp_path / "saved_model" / "2"))
    x = _images(n=4, size=32)
    _assert_outputs_close(loaded(x, trainable=False), model(x, training=False))
