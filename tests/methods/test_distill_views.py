"""Distillation views (`--distill_views`) and mixup (`--mixup_alpha`): Beyer et al.'s settings."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import FlagError, validate
from simclr_tf.methods import common
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment


def test_mix_images_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 4, 4, 3)).astype(np.float32)
    weights = rng.uniform(size=5).astype(np.float32)
    partners = np.array([3, 0, 4, 1, 2], np.int32)
    expected = weights[:, None, None, None] * images + (1 - weights[:, None, None, None]) * images[partners]
    np.testing.assert_allclose(common.mix_images(tf.constant(images), tf.constant(weights), tf.constant(partners)),
                               expected, rtol=1e-6)


def test_mixup_draw_is_beta_distributed_seeded_and_pairs_by_a_permutation():
    alpha, n = 0.4, 20_000
    weights, partners = common.mixup_draw(tf.constant([1, 2], tf.int64), n, alpha=alpha)
    weights = weights.numpy()
    assert weights.min() >= 0 and weights.max() <= 1
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 5 standard errors.
    assert abs(weights.mean() - 0.5) < 5 * np.sqrt(1 / (4 * (2 * alpha + 1)) / n)
    np.testing.assert_allclose(weights.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.05)
    assert sorted(partners.numpy()) == list(range(n))
    again, _ = common.mixup_draw(tf.constant([1, 2], tf.int64), n, alpha=alpha)
    other, _ = common.mixup_draw(tf.constant([1, 3], tf.int64), n, alpha=alpha)
    np.testing.assert_array_equal(again, weights)
    assert not np.array_equal(other, weights)


def _reference_loss(teacher_logits, student_logits, temperature):
    def log_softmax(x):
        x = np.asarray(x, np.float64) / temperature
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -(np.exp(log_softmax(teacher_logits)) * log_softmax(student_logits)).sum(axis=1).mean()


@pytest.mark.parametrize("views,alpha", [("consistent", 0.5), ("fixed", 0.0)])
def test_teacher_and_student_see_the_views_the_flags_name(views, alpha, tiny_classifier_dir, tiny_method_config, tmp_path):
    config = tiny_method_config("distill", distill={"teacher_checkpoint": tiny_classifier_dir, "distill_temperature": 2.0,
                                             "distill_views": views, "mixup_alpha": alpha})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    # A one-step teacher's logits hardly depend on the image: a large random head makes
    # them do, so which images the teacher sees shows in the loss.
    rng = np.random.default_rng(0)
    for variable in state.method.teacher.supervised_head.weights:
        variable.assign(10 * rng.normal(size=variable.shape).astype("float32"))
    batch = next(iter(experiment.replica_train_dataset(8)))
    assert batch["image"].shape == (8, 16, 16, 3)
    if views == "fixed":
        assert batch["teacher_image"].shape == (8, 16, 16, 3)
        assert not np.array_equal(batch["teacher_image"], batch["image"])
        teacher_in, student_in = batch["teacher_image"], batch["image"]
    else:
        assert "teacher_image" not in batch
        mixed = state.method.mixup(batch["image"])  # the step's draw: same seed and step
        teacher_in = student_in = mixed
        assert not np.allclose(mixed, batch["image"])
    weights = state.model.get_weights()
    loss, _ = state.method(state.model, batch)
    state.model.set_weights(weights)
    teacher_logits = state.method.teacher(teacher_in, training=False)["logits_sup"]
    student_logits = state.model(student_in, training=True)["logits_sup"]
    np.testing.assert_allclose(float(loss), _reference_loss(teacher_logits, student_logits, 2.0), rtol=1e-5)


def test_mixup_needs_consistent_views(tiny_method_config):
    config = tiny_method_config("distill", distill={"teacher_checkpoint": "t", "distill_views": "fixed", "mixup_alpha": 0.2})
    with pytest.raises(FlagError, match="^--mixup_alpha"):
        validate(config)
    with pytest.raises(FlagError, match="^--distill_views"):
        validate(config.replace(distill={"distill_views": "same"}))
