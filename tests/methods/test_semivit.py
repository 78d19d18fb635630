"""Semi-ViT: the probabilistic pseudo-mixup loss against NumPy, the EMA teacher, a step from a checkpoint."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.methods import fixmatch, semivit
from simclr_tf.methods.registry import METHODS
from simclr_tf.train import checkpoints, trainer
from simclr_tf.train.experiment import Experiment

B, U, C = 4, 12, 5


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _numpy_loss(labeled, labels, teacher, partners, mixed, threshold, weight, true_labels):
    """The reference's arithmetic (engine_semi.py, util/mixup.py ProbPseudoMixup), written out."""
    sup = -np.mean(_log_softmax(labeled)[np.arange(len(labels)), labels])
    probs = _softmax(teacher)
    conf, pseudo = probs.max(-1), probs.argmax(-1)
    lam = conf / (conf + conf[partners])
    targets = lam[:, None] * np.eye(C)[pseudo] + (1 - lam)[:, None] * np.eye(C)[pseudo[partners]]
    mask = (np.maximum(conf, conf[partners]) >= threshold).astype(np.float64)
    unsup = np.mean(mask * -(targets * _log_softmax(mixed)).sum(-1))
    confident = conf >= threshold
    metrics = {"unlabeled_loss": unsup, "mask_rate": confident.mean(), "mixed_mask_rate": mask.mean(),
               "pseudo_label_acc": (pseudo == true_labels)[confident].mean(), "supervised_loss": sup}
    return sup + weight * unsup, metrics, lam, conf


def test_pseudo_mixup_loss_matches_numpy():
    rng = np.random.default_rng(0)
    labeled, teacher, mixed = (rng.normal(size=(n, C)) * 2.5 for n in (B, U, U))
    labels, true_labels = rng.integers(0, C, B), rng.integers(0, C, U)
    partners = rng.permutation(U)
    threshold, weight = 0.6, 5.0
    loss, metrics = semivit.probabilistic_pseudo_mixup_loss(
        labeled_logits=tf.constant(labeled, tf.float32), labels=labels,
        teacher_logits=tf.constant(teacher, tf.float32),
        partner_teacher_logits=tf.constant(teacher[partners], tf.float32),
        mixed_logits=tf.constant(mixed, tf.float32), threshold=threshold, unlabeled_weight=weight,
        unlabeled_labels=tf.constant(true_labels),
    )
    want, want_metrics, lam, conf = _numpy_loss(labeled, labels, teacher, partners, mixed, threshold, weight,
                                                true_labels)
    # The data has rows kept only for their partner's confidence, and rows dropped.
    assert np.any((conf < threshold) & (conf[partners] >= threshold)) and 0 < want_metrics["mixed_mask_rate"] < 1
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name].numpy(), value, rtol=1e-5, err_msg=name)
    weights = semivit.pseudo_mixup_weights(teacher_logits=tf.constant(teacher, tf.float32),
                                           partner_teacher_logits=tf.constant(teacher[partners], tf.float32))
    np.testing.assert_allclose(weights.numpy(), lam, rtol=1e-6)
    images = rng.uniform(size=(U, 2, 2, 3)).astype(np.float32)
    mixed_images = semivit.mix_with_partners(tf.constant(images), tf.constant(images[partners]), weights)
    np.testing.assert_allclose(mixed_images.numpy(), lam[:, None, None, None] * images
                               + (1 - lam[:, None, None, None]) * images[partners], rtol=1e-6, atol=1e-7)


def test_own_partner_is_fixmatch_with_the_teachers_labels_and_only_the_student_gets_gradients():
    rng = np.random.default_rng(1)
    labeled, teacher, mixed = (tf.Variable(rng.normal(size=(n, C)).astype(np.float32) * 2) for n in (B, U, U))
    labels = rng.integers(0, C, B)
    with tf.GradientTape(persistent=True) as tape:
        loss, _ = semivit.probabilistic_pseudo_mixup_loss(
            labeled_logits=labeled, labels=labels, teacher_logits=teacher, partner_teacher_logits=teacher,
            mixed_logits=mixed, threshold=0.5, unlabeled_weight=2.0,
        )
    want, _ = fixmatch.fixmatch_loss(labeled_logits=labeled, labels=labels, weak_logits=teacher,
                                     strong_logits=mixed, threshold=0.5, unlabeled_weight=2.0)
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-6)
    assert tape.gradient(loss, teacher) is None
    assert tape.gradient(loss, mixed) is not None and tape.gradient(loss, labeled) is not None


def test_checkpoint_required_and_the_papers_defaults(tiny_method_config):
    config = tiny_method_config("semivit")
    with pytest.raises(config_lib.FlagError, match="^--checkpoint: --train_mode=semivit"):
        semivit.SemiVit.check_flags(config, resuming=False)
    semivit.SemiVit.check_flags(config, resuming=True)  # a resumed run restores its own model_dir
    semivit.SemiVit.check_flags(config.replace(train={"mode": "eval"}), resuming=False)
    assert semivit.SemiVit.defaults == {"unlabeled_batch_ratio": 5, "pseudo_label_threshold": 0.7,
                                        "unlabeled_loss_weight": 5.0}
    # The semi-supervised modes that need a checkpoint are the ones the tools do not run from scratch.
    needs = set()
    for mode in config_lib.SEMI_SUPERVISED_MODES:
        try:
            METHODS[mode].check_flags(tiny_method_config(mode), resuming=False)
        except config_lib.FlagError as error:
            assert str(error).startswith("--checkpoint"), error
            needs.add(mode)
    assert needs == set(config_lib.SEMI_SUPERVISED_FROM_CHECKPOINT_MODES)


@pytest.fixture
def semivit_state(tiny_method_config, tiny_classifier_dir, tmp_path):
    # Dropout: the teacher must predict without it (inference mode), as the reference's `.eval()`.
    config = tiny_method_config("semivit", train={"checkpoint": tiny_classifier_dir}, model={"dropout_rate": 0.5},
                                semi={"unlabeled_batch_ratio": 2, "ema_decay": 0.5, "pseudo_label_threshold": 0.0})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    return experiment, state, next(iter(experiment.replica_train_dataset(8)))


def test_the_weight_average_labels_the_weak_views_in_inference_mode(semivit_state):
    experiment, state, batch = semivit_state
    method, model = state.method, state.model
    assert state.restore_report.source == "checkpoint"
    for average, weight in zip(method.average.model.weights, model.weights):  # it starts at the checkpoint
        np.testing.assert_array_equal(average.numpy(), weight.numpy())
    weak, strong = method.split_unlabeled(batch)
    # A sharper average, so its confidences (the mixing weights) and labels differ from row to row.
    # A seeded random head on the average's features: logits of std ~2 per class, whatever
    # the shared tiny classifier learnt (its own head can give every row the same confidence).
    kernel, bias = method.average.model.supervised_head.weights
    features = method.average.model(weak, training=False)["supervised_head_input"].numpy()
    rng = np.random.default_rng(0)
    scale = 2.0 / (np.std(features) * np.sqrt(features.shape[1]))
    kernel.assign(rng.normal(size=kernel.shape).astype("float32") * scale)
    bias.assign(np.zeros(bias.shape, "float32"))
    # The loss is the pure function's on the average's inference-mode logits, mixed with
    # the step's draw (the student's dropout draws again from the same seed state).
    state = [v.numpy() for v in model.non_trainable_variables]
    loss, metrics = method(model, batch)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    teacher = method.average.model(weak, training=False)["logits_sup"]
    partners = method.permutation(tf.shape(strong)[0])
    weights = semivit.pseudo_mixup_weights(teacher_logits=teacher, partner_teacher_logits=tf.gather(teacher, partners))
    assert np.ptp(weights.numpy()) > 0.1, weights  # the pairs mix in different proportions
    mixed = semivit.mix_with_partners(strong, tf.gather(strong, partners), weights)
    labeled_logits, mixed_logits = method.logits_of(model, batch["image"], mixed)
    want, _ = semivit.probabilistic_pseudo_mixup_loss(
        labeled_logits=labeled_logits, labels=batch["label"], teacher_logits=teacher,
        partner_teacher_logits=tf.gather(teacher, partners), mixed_logits=mixed_logits,
        threshold=0.0, unlabeled_weight=5.0,
    )
    assert metrics["unlabeled_loss"].numpy() > 0  # every row kept (threshold 0): the teacher matters
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-5)
    # Unlabeled true labels feed monitoring only.
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    corrupted, _ = method(model, dict(batch, unlabeled_label=(batch["unlabeled_label"] + 3) % 10))
    assert float(corrupted) == float(loss)
    # Make the average and the student disagree: the average's classifier says class 3 for
    # everything, the student's class 7 (set, not left to the tiny classifier, whose near-zero
    # logits may happen to say 3 too). The pseudo-labels follow the average.
    bias.assign(bias.numpy() + 30.0 * np.eye(10, dtype=np.float32)[3])
    student_bias = model.supervised_head.weights[1]
    saved_bias = student_bias.numpy()
    student_bias.assign(saved_bias + 30.0 * np.eye(10, dtype=np.float32)[7])
    assert np.all(np.argmax(model(weak, training=False)["logits_sup"].numpy(), -1) == 7)
    _, metrics = method(model, batch)
    student_bias.assign(saved_bias)
    np.testing.assert_array_equal(metrics["pseudo_label_class_fraction"].numpy(), np.eye(10)[3])
    assert metrics["mask_rate"].numpy() == metrics["mixed_mask_rate"].numpy() == 1.0


def test_one_step_from_a_checkpoint_moves_the_average_and_draws_a_new_pairing(semivit_state):
    experiment, state, batch = semivit_state
    method, model = state.method, state.model
    first = method.permutation(16).numpy()
    np.testing.assert_array_equal(method.permutation(16).numpy(), first)  # a function of (seed, step)
    assert sorted(first) == list(range(16)) and not np.array_equal(first, np.arange(16))
    before = [w.numpy().copy() for w in model.trainable_weights]
    values = trainer.make_train_step(experiment, state)(batch)  # eagerly
    method.after_update(model)
    assert bool(values["finite"]) and set(method.metric_names(model)) <= set(values)
    after = [w.numpy() for w in model.trainable_weights]
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0
    for average, start, end in zip(method.average.model.trainable_weights, before, after):
        np.testing.assert_allclose(average.numpy(), 0.5 * start + 0.5 * end, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(method.permutation(16).numpy(), first)  # the next step pairs anew
    path = state.manager.save()
    assert checkpoints.checkpoint_variables_by_path(path, "ema_model")
