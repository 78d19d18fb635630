"""Meta Pseudo Labels: its losses and the teacher's reward against NumPy, and one step of each variant.

tests/methods/test_semi_supervised_modes.py runs `mpl` (two models) with every other
semi-supervised mode; here the parts only MPL has.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.methods import mpl
from simclr_tf.train import checkpoints, trainer
from simclr_tf.train.experiment import Experiment

B, U, C = 6, 12, 5


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _ce(logits, labels):
    return -_log_softmax(logits)[np.arange(len(labels)), labels].mean()


def _logits(seed):
    rng = np.random.default_rng(seed)
    f = lambda n, s: (s * rng.normal(size=(n, C))).astype(np.float32)  # noqa: E731
    return {"labeled": f(B, 2.0), "labels": rng.integers(0, C, size=B), "weak": f(U, 3.0),
            "strong": f(U, 2.0), "true_u": rng.integers(0, C, size=U)}


def test_hard_pseudo_labels_argmax_and_seeded_samples():
    x = _logits(0)
    np.testing.assert_array_equal(mpl.hard_pseudo_labels(x["strong"]).numpy(), x["strong"].argmax(axis=1))
    # Samples follow the softmax: 4,000 draws of one row.
    row = np.array([[2.0, 1.0, 0.0, -1.0, 0.5]], np.float32)
    seed = tf.constant([3, 4], tf.int64)
    draws = mpl.hard_pseudo_labels(np.repeat(row, 4000, axis=0), mode="sample", seed=seed).numpy()
    np.testing.assert_allclose(np.bincount(draws, minlength=C) / 4000, np.exp(_log_softmax(row))[0], atol=0.03)
    # Stateless: the same seed draws the same labels (a resumed run), another seed others.
    again = mpl.hard_pseudo_labels(np.repeat(row, 4000, axis=0), mode="sample", seed=seed).numpy()
    other = mpl.hard_pseudo_labels(np.repeat(row, 4000, axis=0), mode="sample", seed=seed + 1).numpy()
    assert (draws == again).all() and (draws != other).any()
    with pytest.raises(ValueError, match="seed"):
        mpl.hard_pseudo_labels(row, mode="sample")


@pytest.mark.parametrize("reward", [-0.3, 0.0, 0.7])
@pytest.mark.parametrize("uda_weight", [0.0, 8.0])
def test_teacher_loss_matches_numpy(reward, uda_weight):
    x = _logits(1)
    temperature, confidence = 0.7, 0.6
    pseudo = x["strong"].argmax(axis=1)
    loss, metrics = mpl.teacher_loss(
        labeled_logits=x["labeled"], labels=x["labels"], weak_logits=x["weak"], strong_logits=x["strong"],
        pseudo_labels=pseudo, reward=reward, uda_weight=uda_weight, temperature=temperature,
        confidence=confidence, unlabeled_labels=x["true_u"],
    )
    sup = _ce(x["labeled"], x["labels"])
    p_weak = np.exp(_log_softmax(x["weak"]))
    mask = p_weak.max(axis=1) > confidence  # UDA's strict mask on the unsharpened prediction
    assert 0 < mask.sum() < U  # the fixture exercises it both ways
    target = np.exp(_log_softmax(x["weak"] / temperature))
    kl = (target * (np.log(target) - _log_softmax(x["strong"]))).sum(axis=1)
    consistency = (kl * mask).mean()
    meta = _ce(x["strong"], pseudo)
    np.testing.assert_allclose(loss.numpy(), sup + uda_weight * consistency + reward * meta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["teacher_supervised_loss"].numpy(), sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["uda_loss"].numpy(), consistency, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_rate"].numpy(), mask.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["mpl_reward"].numpy(), reward, rtol=1e-6)
    np.testing.assert_allclose(metrics["pseudo_label_acc"].numpy(), (pseudo == x["true_u"]).mean(), rtol=1e-6)


def test_a_positive_reward_reinforces_the_pseudo_label():
    # d/d strong of reward * mean CE(y^, strong), the other terms off: the teacher's
    # descent step raises p(y^) exactly when the student's step helped (reward > 0).
    x = _logits(2)
    pseudo = np.random.default_rng(0).integers(0, C, size=U)
    strong = tf.Variable(x["strong"])
    for reward in (0.5, -0.5):
        with tf.GradientTape() as tape:
            loss, _ = mpl.teacher_loss(
                labeled_logits=x["labeled"], labels=x["labels"], weak_logits=x["weak"], strong_logits=strong,
                pseudo_labels=pseudo, reward=reward, uda_weight=0.0,
            )
        grad = tape.gradient(loss, strong).numpy()
        expected = reward * (np.exp(_log_softmax(x["strong"])) - np.eye(C)[pseudo]) / U
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
        stepped = x["strong"] - 1.0 * grad
        gain = _log_softmax(stepped)[np.arange(U), pseudo] - _log_softmax(x["strong"])[np.arange(U), pseudo]
        assert (gain > 0).all() if reward > 0 else (gain < 0).all()


def test_pseudo_label_loss_and_reward_sign():
    x = _logits(3)
    pseudo = x["strong"].argmax(axis=1)
    np.testing.assert_allclose(
        mpl.pseudo_label_loss(logits=x["strong"], pseudo_labels=pseudo).numpy(), _ce(x["strong"], pseudo), rtol=1e-6
    )
    # The labeled loss the step removed: positive when the student improved.
    reward = mpl.mpl_reward(labeled_loss_before=tf.constant(1.25), labeled_loss_after=tf.constant(1.0))
    assert reward.numpy() == pytest.approx(0.25)


def test_gradient_as_loss_has_the_value_and_the_gradient_given():
    a, b = tf.Variable([[1.0, -2.0], [0.5, 3.0]]), tf.Variable([4.0, -1.0])
    grads = [tf.constant([[0.1, 0.2], [0.3, 0.4]]), tf.constant([-1.0, 2.0])]
    with tf.GradientTape() as tape:
        surrogate = mpl.gradient_as_loss([a, b], grads, tf.constant(7.5))
    assert surrogate.numpy() == 7.5
    for got, want in zip(tape.gradient(surrogate, [a, b]), grads):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def _tiny_classifier(num_features=4, seed=0):
    """x -> batch norm -> dense: {"logits_sup": (N, C)}, as the package's models return."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((num_features,))
    normalised = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.5)(inputs)
    logits = keras.layers.Dense(C, kernel_initializer="glorot_normal", bias_initializer="random_normal")(normalised)
    return keras.Model(inputs, {"logits_sup": logits})


def _numpy_labeled_loss(model, kernel, bias, x, labels):
    gamma, beta = (w.numpy() for w in model.layers[1].trainable_weights)
    mean, var = x.mean(axis=0), x.var(axis=0)  # training mode: the batch's own statistics
    normalised = (x - mean) / np.sqrt(var + 1e-3) * gamma + beta
    return _ce(normalised @ kernel + bias, labels)


def test_the_reward_is_the_labeled_loss_a_virtual_step_removes():
    model = _tiny_classifier()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 4)).astype(np.float32) * np.array([1, 2, 0.5, 3], np.float32)
    labels = rng.integers(0, C, size=B)
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in model.trainable_variables]
    weights = [w.numpy() for w in model.weights]
    lr = 0.3
    before, after, metrics = mpl.labeled_loss_before_and_after_step(
        model, grads=grads, learning_rate=lr, images=tf.constant(x), labels=labels,
    )
    # Only the dense layer's step is checked in NumPy: batch norm's scale and offset (the
    # first two trainable variables) get no virtual step here.
    names = [v.path for v in model.trainable_variables]
    assert names[0].endswith("gamma") and names[2].endswith("kernel")
    kernel, bias = model.layers[2].kernel.numpy(), model.layers[2].bias.numpy()
    grads_without_bn = [np.zeros_like(g) for g in grads[:2]] + grads[2:]
    before2, after2, _ = mpl.labeled_loss_before_and_after_step(
        model, grads=grads_without_bn, learning_rate=lr, images=tf.constant(x), labels=labels,
    )
    np.testing.assert_allclose(before.numpy(), _numpy_labeled_loss(model, kernel, bias, x, labels), rtol=1e-5)
    np.testing.assert_allclose(before2.numpy(), before.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        after2.numpy(), _numpy_labeled_loss(model, kernel - lr * grads[2], bias - lr * grads[3], x, labels), rtol=1e-5
    )
    assert abs(after.numpy() - after2.numpy()) > 1e-4  # batch norm's step counts too
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), before.numpy())
    # Nothing was assigned: weights and batch-norm moving statistics are as they were.
    for w, value in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), value, err_msg=w.path)

    # The paper's h = lr * grad CE_l(theta') . g_u, to first order: with g_u = grad CE_l
    # itself, a small step removes lr * |g|^2 of the labeled loss (h > 0).
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            labels, model(x, training=True)["logits_sup"], from_logits=True))
    g = tape.gradient(loss, model.trainable_variables)
    small = 1e-3
    before, after, _ = mpl.labeled_loss_before_and_after_step(
        model, grads=g, learning_rate=small, images=tf.constant(x), labels=labels,
    )
    reward = mpl.mpl_reward(labeled_loss_before=before, labeled_loss_after=after).numpy()
    first_order = small * sum(float(np.sum(t.numpy() ** 2)) for t in g)
    assert reward > 0
    np.testing.assert_allclose(reward, first_order, rtol=0.05)


def test_flags_mpl_cannot_train_with(tiny_method_config):
    config = tiny_method_config("mpl")
    mpl.Mpl.check_flags(config, resuming=False)
    with pytest.raises(config_lib.FlagError, match="^--precision: --train_mode=mpl"):
        mpl.Mpl.check_flags(config.replace(runtime={"precision": "mixed_float16"}), resuming=False)
    for flag in ("pseudo_label_threshold", "unlabeled_loss_weight"):
        with pytest.raises(config_lib.FlagError, match=f"^--{flag}: --train_mode=mpl does not use it"):
            mpl.Mpl.check_flags(config.replace(semi={flag: 0.5}), resuming=False)
    for fields, flag in (({"mpl_student_lr": 0.0}, "mpl_student_lr"), ({"mpl_uda_weight": -1.0}, "mpl_uda_weight"),
                         ({"mpl_pseudo_labels": "soft"}, "mpl_pseudo_labels")):
        with pytest.raises(config_lib.FlagError, match=f"^--{flag}: "):
            config_lib.validate(config.replace(mpl=fields))


def test_one_self_mpl_step_trains_one_model(tiny_method_config, tmp_path):
    # Two-model MPL runs with the other modes in test_semi_supervised_modes.py (its
    # checkpoint holds "mpl_teacher"); Self-MPL here, with sampled pseudo-labels.
    config = tiny_method_config(
        "mpl", semi={"unlabeled_batch_ratio": 2, "ema_decay": 0.5},
        mpl={"mpl_self": True, "mpl_pseudo_labels": "sample", "mpl_student_lr": 0.05},
    )
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    method, model = state.method, state.model
    assert method.teacher is None and method.extra_trainable_variables() == []
    batch = next(iter(experiment.replica_train_dataset(8)))
    # The loss is (1 + h) CE(y^, own strong view) + CE_l + w_uda UDA, h the reward, on one pass.
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss, metrics = method(model, batch)
    grads = tape.gradient(loss, variables)
    weak, strong = method.split_unlabeled(batch)
    with tf.GradientTape() as tape:
        labeled, weak_logits, strong_logits = method.logits_of(model, batch["image"], weak, strong)
        pseudo = method.pseudo_labels(strong_logits)  # the same seeded draw: same step, same logits
        expected, _ = mpl.teacher_loss(
            labeled_logits=labeled, labels=batch["label"], weak_logits=weak_logits, strong_logits=strong_logits,
            pseudo_labels=pseudo, reward=0.0, uda_weight=config.mpl.mpl_uda_weight,
            temperature=config.semi.uda_temperature, confidence=config.semi.uda_confidence,
        )
        expected += (1.0 + metrics["mpl_reward"]) * mpl.pseudo_label_loss(logits=strong_logits, pseudo_labels=pseudo)
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-5)
    for got, want, v in zip(grads, tape.gradient(expected, variables), variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6, err_msg=v.path)
    assert metrics["mpl_reward"].numpy() != 0

    before = [w.numpy() for w in model.trainable_weights]
    values = trainer.make_train_step(experiment, state)(batch)  # eagerly: no tracing
    assert bool(values["finite"]) and np.isfinite(float(values["total_loss"]))
    assert max(np.abs(w.numpy() - b).max() for w, b in zip(model.trainable_weights, before)) > 0
    assert set(method.metric_names(model)) <= set(values)
    # One model, so one set of optimizer slots: half of two-model MPL's.
    # (Momentum: one slot a weight, and the step count.)
    assert len(state.optimizer.variables) < 1.5 * len(model.trainable_variables)
    path = state.manager.save()
    assert checkpoints.checkpoint_variables_by_path(path, "model")
    assert not checkpoints.checkpoint_variables_by_path(path, "mpl_teacher")


def test_the_teacher_starts_from_the_checkpoint_but_a_resumed_one_is_kept(
    tiny_method_config, tiny_classifier_dir, tmp_path
):
    config = tiny_method_config("mpl", train={"checkpoint": tiny_classifier_dir}, semi={"unlabeled_batch_ratio": 2})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "checkpoint"
    teacher, model = state.method.teacher, state.model
    for teacher_weight, weight in zip(teacher.weights, model.weights):
        np.testing.assert_array_equal(teacher_weight.numpy(), weight.numpy())
    # A resumed run restored its trained teacher with the checkpoint: not overwritten.
    kernel = teacher.trainable_weights[-2]
    kernel.assign(kernel.numpy() + 1.0)
    state.method.after_restore(model, dataclasses.replace(state.restore_report, source="model_dir"))
    np.testing.assert_array_equal(kernel.numpy(), model.trainable_weights[-2].numpy() + 1.0)
    assert set(state.method.checkpoint_items()) == {"ema_model", "mpl_teacher"}


def test_a_two_model_step_gives_the_student_g_u_and_the_teacher_the_reward(tiny_method_config, tmp_path):
    # The method's loss against the same quantities computed the plain way: the student's
    # gradient is that of CE(teacher's strong-view argmax, student), and the reward is the
    # labeled loss after really assigning theta - lr * g_u.
    lr = 0.5
    config = tiny_method_config("mpl", semi={"unlabeled_batch_ratio": 2}, mpl={"mpl_student_lr": lr})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    method, model = state.method, state.model
    batch = next(iter(experiment.replica_train_dataset(8)))
    weak, strong = method.split_unlabeled(batch)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss, metrics = method(model, batch)
    student_grads = tape.gradient(loss, variables)

    teacher_logits = method.teacher(tf.concat([batch["image"], weak, strong], 0), training=True)["logits_sup"]
    pseudo = tf.argmax(teacher_logits[-strong.shape[0]:], axis=-1)
    with tf.GradientTape() as tape:
        expected_loss = mpl.pseudo_label_loss(logits=model(strong, training=True)["logits_sup"], pseudo_labels=pseudo)
    g_u = tape.gradient(expected_loss, variables)
    for got, want, v in zip(student_grads, g_u, variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6, err_msg=v.path)
    np.testing.assert_allclose(metrics["unlabeled_loss"].numpy(), expected_loss.numpy(), rtol=1e-5)

    def labeled_loss():
        logits = model(batch["image"], training=True)["logits_sup"]
        return float(mpl.pseudo_label_loss(logits=logits, pseudo_labels=batch["label"]))

    before = labeled_loss()
    for v, g in zip(variables, g_u):
        v.assign(v - lr * g)
    after = labeled_loss()
    assert abs(before - after) > 1e-4
    np.testing.assert_allclose(metrics["mpl_reward"].numpy(), before - after, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"].numpy(), before, rtol=1e-5)
