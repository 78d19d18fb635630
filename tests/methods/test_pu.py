"""`--train_mode=pu`: the nnPU risk against NumPy, class-restricted subsets, a run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import FlagError
from simclr_tf.data import LabeledSubset, labeled_subset_indices
from simclr_tf.methods.pu import positive_class_ids, pu_loss
from simclr_tf.train import evaluation, train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _value_and_grads(positive, unlabeled, **kwargs):
    p, u = tf.Variable(positive), tf.Variable(unlabeled)
    with tf.GradientTape() as tape:
        loss, metrics = pu_loss(positive_scores=p, unlabeled_scores=u, **kwargs)
    gp, gu = tape.gradient(loss, [p, u])
    return loss.numpy(), {k: v.numpy() for k, v in metrics.items()}, gp.numpy(), gu.numpy()


@pytest.mark.parametrize("shift,overfitting", [(0.0, False), (4.0, True)])
def test_nnpu_matches_numpy_on_both_sides_of_the_correction(shift, overfitting):
    rng = np.random.default_rng(0)
    prior, beta, gamma = 0.3, 0.05, 0.5
    # Confident positives and unlabeled scored negative (an overfitted model): then
    # pi E_P[l(-g)] exceeds E_U[l(-g)] and the negative-risk estimate goes below 0.
    positive = (rng.normal(size=6) + shift).astype(np.float32)
    unlabeled = (rng.normal(size=10) - shift).astype(np.float32)
    positive_risk = prior * _sigmoid(-positive).mean()
    negative_risk = _sigmoid(unlabeled).mean() - prior * _sigmoid(positive).mean()
    assert (negative_risk < -beta) == overfitting
    # Gradients of the two parts (d/dz sigmoid(z) = s (1 - s)).
    d_positive_risk = -prior * _sigmoid(positive) * (1 - _sigmoid(positive)) / len(positive)
    d_negative_p = -prior * _sigmoid(positive) * (1 - _sigmoid(positive)) / len(positive)
    d_negative_u = _sigmoid(unlabeled) * (1 - _sigmoid(unlabeled)) / len(unlabeled)

    loss, metrics, gp, gu = _value_and_grads(positive, unlabeled, prior=prior, loss="nnpu", beta=beta, gamma=gamma)
    np.testing.assert_allclose(metrics["positive_risk"], positive_risk, rtol=1e-5)
    np.testing.assert_allclose(metrics["negative_risk"], negative_risk, rtol=1e-5)
    if overfitting:  # report pi E_P[l(g)] - beta, descend on -gamma * negative risk
        np.testing.assert_allclose(metrics["pu_risk"], positive_risk - beta, rtol=1e-5)
        np.testing.assert_allclose(loss, -gamma * negative_risk, rtol=1e-5)
        np.testing.assert_allclose(gp, -gamma * d_negative_p, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(gu, -gamma * d_negative_u, rtol=1e-4, atol=1e-8)
    else:
        np.testing.assert_allclose(loss, positive_risk + negative_risk, rtol=1e-5)
        np.testing.assert_allclose(metrics["pu_risk"], loss, rtol=1e-6)
        np.testing.assert_allclose(gp, d_positive_risk + d_negative_p, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(gu, d_negative_u, rtol=1e-4, atol=1e-8)


def test_unlabeled_as_negative_is_the_biased_risk():
    positive, unlabeled = np.array([0.5, -1.0], np.float32), np.array([2.0, -0.5, 0.1], np.float32)
    loss, _, _, _ = _value_and_grads(positive, unlabeled, prior=0.2, loss="unlabeled_as_negative")
    np.testing.assert_allclose(loss, 0.2 * _sigmoid(-positive).mean() + 0.8 * _sigmoid(unlabeled).mean(), rtol=1e-6)


def test_the_logistic_surrogate_is_softplus():
    positive, unlabeled = np.array([0.5, -1.0], np.float32), np.array([2.0, -0.5, 0.1], np.float32)

    def softplus(z):
        return np.log1p(np.exp(np.asarray(z, np.float64)))

    _, metrics, _, _ = _value_and_grads(positive, unlabeled, prior=0.2, surrogate="logistic")
    np.testing.assert_allclose(metrics["positive_risk"], 0.2 * softplus(-positive).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["negative_risk"], softplus(unlabeled).mean() - 0.2 * softplus(positive).mean(),
                               rtol=1e-6)


def test_positive_classes_by_name_or_id():
    names = ["airplane", "cat", "dog"]
    assert positive_class_ids("cat", names) == (1,)
    assert positive_class_ids("2, airplane", names) == (0, 2)
    for bad in ("horse", "", "0,1,2", "7"):
        with pytest.raises(FlagError, match="^--positive_classes"):
            positive_class_ids(bad, names)


def test_a_class_restricted_subset_keeps_what_the_full_subset_keeps_of_those_classes():
    labels = np.random.default_rng(1).integers(0, 5, size=300)
    full = labeled_subset_indices(labels, LabeledSubset(fraction=0.2, seed=3))
    restricted = labeled_subset_indices(labels, LabeledSubset(fraction=0.2, seed=3, classes=(1, 4)))
    np.testing.assert_array_equal(restricted, full[np.isin(labels[full], [1, 4])])
    assert not LabeledSubset(classes=(1,)).is_everything


def pu_config(tiny_method_config, **sections):
    return tiny_method_config("pu", data={"train_split": "train[:64]", "labeled_per_class": 4},
                              train={"train_batch_size": 4},
                              pu={"positive_classes": "3,5", "pu_prior": 0.2}).replace(**sections)


def test_a_step_reads_positives_only_as_labeled_and_never_the_unlabeled_labels(tiny_method_config, tmp_path):
    experiment = Experiment.create(pu_config(tiny_method_config), str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.model.supervised_head.weights[0].shape[-1] == 2
    batch = next(iter(experiment.replica_train_dataset(4)))
    assert set(batch["label"].numpy()) <= {3, 5}
    np.testing.assert_array_equal(state.method.eval_labels(tf.constant([0, 3, 5, 9])), [0, 1, 1, 0])
    weights = state.model.get_weights()
    loss, _ = state.method(state.model, batch)
    state.model.set_weights(weights)
    corrupted, _ = state.method(state.model, dict(batch, unlabeled_label=(batch["unlabeled_label"] + 1) % 10))
    assert float(loss) == float(corrupted)


def test_evaluation_measures_binary_accuracy(tiny_method_config, tmp_path):
    result = train_and_evaluate(pu_config(tiny_method_config, train={"mode": "train_then_eval"}), str(tmp_path / "run"))
    assert result["global_step"] == 1 and 0 <= result["eval/label_top_1_accuracy"] <= 1
    # A classifier that always says "negative" scores the negatives' share of the split.
    experiment = Experiment.create(pu_config(tiny_method_config), str(tmp_path / "constant"))
    model = trainer.build_train_state(experiment).model
    kernel, bias = model.supervised_head.weights
    kernel.assign(tf.zeros_like(kernel))
    bias.assign([10.0, 0.0])
    labels = np.concatenate([b["label"].numpy() for b in experiment.eval_dataset("validation[:16]")])
    result = evaluation.evaluate(experiment, model, global_step=0)
    np.testing.assert_allclose(result["eval/label_top_1_accuracy"], np.mean(~np.isin(labels, [3, 5])), rtol=1e-6)


def _fit_linear(loss, positive, unlabeled, prior, seed):
    import keras

    rng = np.random.default_rng(seed)
    w, b = tf.Variable(tf.zeros([2])), tf.Variable(0.0)
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step(p, u):
        with tf.GradientTape() as tape:
            value, _ = pu_loss(positive_scores=tf.linalg.matvec(p, w) + b,
                               unlabeled_scores=tf.linalg.matvec(u, w) + b, prior=prior, loss=loss)
        optimizer.apply_gradients(zip(tape.gradient(value, [w, b]), [w, b]))

    for _ in range(300):
        step(positive[rng.integers(0, len(positive), 64)], unlabeled[rng.integers(0, len(unlabeled), 64)])
    return w.numpy(), b.numpy()


def test_nnpu_learns_what_treating_unlabeled_as_negative_misses():
    # Two Gaussian classes in 2-D, 10% positives among the unlabeled points: a linear
    # score trained on the nnPU risk finds the positives; the biased risk calls all negative.
    rng = np.random.default_rng(0)

    def sample(n, positive_rate):
        y = rng.uniform(size=n) < positive_rate
        return (rng.normal(size=(n, 2)) + np.where(y[:, None], 1.5, -0.5)).astype(np.float32), y

    positive, _ = sample(400, 1.0)
    unlabeled, _ = sample(4000, 0.1)
    test_x, test_y = sample(4000, 0.1)
    accuracy = {}
    for loss in ("nnpu", "unlabeled_as_negative"):
        w, b = _fit_linear(loss, positive, unlabeled, 0.1, seed=1)
        accuracy[loss] = ((test_x @ w + b > 0) == test_y).mean()
    assert accuracy["nnpu"] > 0.94 and accuracy["nnpu"] > accuracy["unlabeled_as_negative"] + 0.03, accuracy
