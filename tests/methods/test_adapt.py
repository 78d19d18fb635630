"""`--train_mode=adapt`: its losses against NumPy, and one run end to end on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import FlagError
from simclr_tf.methods.adapt import adapt_loss, entropy_loss, gce_loss, is_batch_norm_affine
from simclr_tf.train import train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _logits(seed, n=9, c=5):
    return (3.0 * np.random.default_rng(seed).normal(size=(n, c))).astype(np.float32)


def _value_and_grad(fn, logits):
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = fn(variable)
    return value.numpy(), tape.gradient(value, variable).numpy()


def test_entropy_and_its_gradient_match_numpy():
    logits = _logits(0)
    p = _softmax(logits)
    entropy = -(p * np.log(p)).sum(axis=1)
    # d H_i / d z_ij = -p_ij (log p_ij + H_i), averaged over the N rows.
    grad = -p * (np.log(p) + entropy[:, None]) / len(p)
    value, tf_grad = _value_and_grad(entropy_loss, logits)
    np.testing.assert_allclose(value, entropy.mean(), rtol=1e-5)
    np.testing.assert_allclose(tf_grad, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("q", [0.2, 0.8, 1.0])
def test_gce_of_the_own_hard_label_and_its_gradient_match_numpy(q):
    logits = _logits(1)
    p = _softmax(logits)
    labels = p.argmax(axis=1)
    p_label = p[np.arange(len(p)), labels]
    one_hot = np.eye(p.shape[1])[labels]
    # The label is a constant: d/dz_j (1 - p_y^q) / q = -p_y^q (1[j = y] - p_j).
    grad = -(p_label ** q)[:, None] * (one_hot - p) / len(p)
    value, tf_grad = _value_and_grad(lambda z: gce_loss(z, q=q), logits)
    np.testing.assert_allclose(value, ((1 - p_label ** q) / q).mean(), rtol=1e-5)
    np.testing.assert_allclose(tf_grad, grad, rtol=1e-4, atol=1e-7)
    if q == 1.0:  # the mean absolute error of the one-hot label
        np.testing.assert_allclose(value, (1 - p_label).mean(), rtol=1e-5)


def test_gce_tends_to_the_cross_entropy_of_the_hard_label():
    logits = _logits(2)
    p = _softmax(logits)
    cross_entropy = -np.log(p.max(axis=1)).mean()
    np.testing.assert_allclose(gce_loss(tf.constant(logits), q=1e-4).numpy(), cross_entropy, rtol=1e-3)
    with pytest.raises(ValueError, match="q"):
        gce_loss(tf.constant(logits), q=0.0)


@pytest.mark.parametrize("loss", ["entropy", "gce"])
def test_true_labels_only_reach_the_monitoring_metric(loss):
    logits = tf.constant(_logits(3))
    value, metrics = adapt_loss(logits, loss=loss)
    for labels in (np.zeros(9, np.int32), np.arange(9, dtype=np.int32) % 5):
        labelled_value, labelled_metrics = adapt_loss(logits, loss=loss, true_labels=tf.constant(labels))
        assert labelled_value.numpy() == value.numpy()
        hits = (_softmax(logits.numpy()).argmax(axis=1) == labels).mean()
        np.testing.assert_allclose(labelled_metrics["pseudo_label_acc"].numpy(), hits, rtol=1e-6)
    assert "pseudo_label_acc" not in metrics
    np.testing.assert_allclose(metrics["mean_confidence"].numpy(), _softmax(logits.numpy()).max(axis=1).mean(), rtol=1e-5)


@pytest.mark.parametrize("parameters", ["batch_norm", "all"])
def test_a_step_trains_only_what_adapt_parameters_names(parameters, tiny_classifier_dir, tiny_method_config, tmp_path):
    config = tiny_method_config("adapt", train={"checkpoint": tiny_classifier_dir}, adapt={"adapt_parameters": parameters})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source != "scratch"
    model = state.model
    trained = {v.path for v in model.trainable_variables}
    affine = {v.path for v in model.weights if is_batch_norm_affine(v)}
    if parameters == "batch_norm":
        assert trained == affine and affine
        # Momentum slots for the trained variables only (the others' would be dead weight).
        slots = [v for v in state.optimizer.variables if "momentum" in v.path]
        assert len(slots) == len(trained)
    else:
        assert affine < trained
    before = {v.path: v.numpy() for v in model.weights}
    batch = next(iter(experiment.replica_train_dataset(8)))
    step = trainer.make_train_step(experiment, state)
    step(batch)
    changed = {v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path])}
    moving = {v.path for v in model.weights if "moving_" in v.path}
    assert moving <= changed  # batch norm follows the target's statistics
    if parameters == "batch_norm":
        # Only scales and offsets moved (not all: a branch whose last, zero-initialised
        # gamma is still 0 gives its first batch norm no gradient).
        assert changed - moving <= affine and len(changed - moving) > len(affine) // 2
    else:
        assert any(v.path.endswith("kernel") for v in model.weights if v.path in changed)


def test_the_loss_never_reads_the_target_labels(tiny_classifier_dir, tiny_method_config, tmp_path):
    config = tiny_method_config("adapt", train={"checkpoint": tiny_classifier_dir})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    batch = next(iter(experiment.replica_train_dataset(8)))
    weights = state.model.get_weights()
    predicted = tf.argmax(state.model(batch["image"], training=True)["logits_sup"], axis=-1, output_type=tf.int32)
    results = []
    # Labels all equal to the model's predictions, then all different from them.
    for labels in (predicted, (predicted + 1) % 10):
        state.model.set_weights(weights)  # each call updates batch norm's moving statistics
        results.append(state.method(state.model, dict(batch, label=tf.cast(labels, batch["label"].dtype))))
    (right_loss, right_metrics), (wrong_loss, wrong_metrics) = results
    assert float(right_loss) == float(wrong_loss)
    assert float(right_metrics["pseudo_label_acc"]) == 1.0 and float(wrong_metrics["pseudo_label_acc"]) == 0.0


def test_adapt_runs_from_the_cli_config_and_needs_a_checkpoint(tiny_classifier_dir, tiny_method_config, tmp_path):
    result = train_and_evaluate(
        tiny_method_config("adapt", train={"checkpoint": tiny_classifier_dir, "mode": "train_then_eval"}),
        str(tmp_path / "adapted"),
    )
    assert result["global_step"] == 1 and 0 <= result["eval/label_top_1_accuracy"] <= 1
    with pytest.raises(FlagError, match="^--checkpoint"):
        train_and_evaluate(tiny_method_config("adapt"), str(tmp_path / "no_source"))
