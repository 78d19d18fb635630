"""The eval-time linear probe: a converged softmax regression, wired to --linear_probe_eval."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.train import evaluation
from simclr_tf.train import linear_probe
from simclr_tf.train.experiment import Experiment


def _blobs(rng, n, centers, noise=1.0):
    labels = rng.integers(0, len(centers), size=n)
    return centers[labels] + noise * rng.normal(size=(n, centers.shape[1])), labels


def test_separable_classes_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 6) * 8
    train, train_labels = _blobs(rng, 200, centers)
    query, query_labels = _blobs(rng, 50, centers)
    accuracy = linear_probe.linear_probe_top_1_accuracy(
        train, train_labels, query, query_labels, num_classes=4
    )
    assert accuracy == 1.0


def test_fit_reaches_the_regularised_optimum():
    # Overlapping classes: the optimum has a finite kernel, where the gradient vanishes.
    rng = np.random.default_rng(1)
    features, labels = _blobs(rng, 300, rng.normal(size=(3, 5)), noise=1.5)
    features[:, 0] *= 100.0  # very different channel scales, as ReLU features have
    l2 = 1e-2
    mean, scale, kernel, bias = linear_probe.fit_linear_probe(
        features, labels, num_classes=3, steps=2000, l2=l2
    )
    x = (features - mean) / scale
    logits = x @ kernel + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    error = (probs - np.eye(3)[labels]) / len(labels)  # d(mean CE)/d(logits)
    grad_kernel = x.T @ error + l2 * kernel
    grad_bias = error.sum(0)
    assert np.abs(kernel).max() > 0.1  # it did move from zero
    np.testing.assert_allclose(grad_kernel, 0.0, atol=1e-3)
    np.testing.assert_allclose(grad_bias, 0.0, atol=1e-3)


def test_empty_queries_give_nan():
    rng = np.random.default_rng(2)
    features, labels = _blobs(rng, 20, np.eye(2, 3))
    accuracy = linear_probe.linear_probe_top_1_accuracy(
        features, labels, features[:0], labels[:0], num_classes=2
    )
    assert np.isnan(accuracy)


@pytest.mark.parametrize("enabled", [False, True])
def test_evaluate_reports_the_probe_only_when_asked(tmp_path, enabled):
    config = Config.demo().replace(
        data={"train_split": "train[:64]", "eval_split": "validation[:32]"},
        train={"linear_probe_eval": enabled, "eval_batch_size": 32, "train_batch_size": 16},
    )
    experiment = Experiment.create(config, str(tmp_path))
    with experiment.strategy.scope():
        model = experiment.build_model()
    model(tf.zeros([1, 32, 32, 3]), training=False)
    result = evaluation.evaluate(experiment, model, 0)
    assert ("eval/linear_probe_top_1_accuracy" in result) == enabled
    # The linear head trained alongside keeps its own metric.
    assert "eval/label_top_1_accuracy" in result
    if enabled:
        assert 0.0 <= result["eval/linear_probe_top_1_accuracy"] <= 1.0
