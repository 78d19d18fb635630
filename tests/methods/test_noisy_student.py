"""Noisy Student: pseudo-label selection, the pseudo-labelled stream, the loss, and rounds that resume."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import data as data_lib
from simclr_tf import distribute
from simclr_tf.config import FlagError
from simclr_tf.methods import noisy_student
from simclr_tf.methods.registry import METHODS
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment

# Toy teacher probabilities over 3 classes (rows sum to 1): class 0 is common, class 1 rare,
# class 2 never confident enough.
TOY_PROBS = np.array([
    [0.90, 0.05, 0.05],  # 0: class 0
    [0.80, 0.10, 0.10],  # 1: class 0
    [0.70, 0.20, 0.10],  # 2: class 0
    [0.60, 0.30, 0.10],  # 3: class 0
    [0.40, 0.30, 0.30],  # 4: class 0, below the threshold 0.5
    [0.25, 0.55, 0.20],  # 5: class 1
    [0.03, 0.95, 0.02],  # 6: class 1, the most confident of its class
    [0.30, 0.25, 0.45],  # 7: class 2, below
    [0.30, 0.30, 0.40],  # 8: class 2, below
    [0.50, 0.25, 0.25],  # 9: class 0, exactly the threshold (kept)
], np.float32)


def _per_class(indices, probs=TOY_PROBS):
    return np.bincount(probs[indices].argmax(axis=1), minlength=probs.shape[1]).tolist()


@pytest.mark.parametrize("per_class,expected", [
    # 3 per class: class 0 keeps its 3 most confident of 0, 1, 2, 3, 9; class 1 has 2, so each
    # once and the more confident (6) once more; class 2 has none above 0.5.
    (3, [0, 1, 2, 5, 6, 6]),
    # 0: the mean kept count, 7 kept / 3 classes -> 2.
    (0, [0, 1, 5, 6]),
    # 5: class 0 has exactly 5; class 1 gets 2 copies of each and a third of 6.
    (5, [0, 1, 2, 3, 5, 5, 6, 6, 6, 9]),
])
def test_balancing_duplicates_rare_classes_and_keeps_the_most_confident_of_common_ones(per_class, expected):
    indices, targets = noisy_student.select_pseudo_labels(TOY_PROBS, threshold=0.5, per_class=per_class, hard=False)
    assert indices.tolist() == expected
    count = per_class or 2
    assert _per_class(indices) == [count, count, 0]
    np.testing.assert_array_equal(targets, TOY_PROBS[indices])  # soft: the teacher's probabilities


def test_threshold_and_hard_targets():
    indices, targets = noisy_student.select_pseudo_labels(TOY_PROBS, threshold=0.85, per_class=2, hard=True)
    # Only 0 (0.90) and 6 (0.95) reach 0.85: each duplicated up to 2 for its class.
    assert indices.tolist() == [0, 0, 6, 6]
    np.testing.assert_array_equal(targets, np.eye(3, dtype=np.float32)[[0, 0, 1, 1]])
    # A threshold of 0.45 also keeps 7 (class 2, 0.45); the mean count is then 8 / 3 -> 3.
    indices, _ = noisy_student.select_pseudo_labels(TOY_PROBS, threshold=0.45, per_class=0, hard=True)
    assert _per_class(indices) == [3, 3, 3] and indices.tolist().count(7) == 3
    none, targets = noisy_student.select_pseudo_labels(TOY_PROBS, threshold=0.99, per_class=0, hard=False)
    assert none.shape == (0,) and targets.shape == (0, 3)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _reference_loss(labeled_logits, labels, pseudo_logits, targets, weight):
    labeled = -_log_softmax(labeled_logits)[np.arange(len(labels)), labels].mean()
    pseudo = -(np.asarray(targets, np.float64) * _log_softmax(pseudo_logits)).sum(axis=1).mean()
    return labeled + weight * pseudo, pseudo


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    labeled_logits, pseudo_logits = 3 * rng.normal(size=(4, 5)), 3 * rng.normal(size=(12, 5))
    labels = rng.integers(0, 5, size=4)
    targets = rng.dirichlet(np.ones(5), size=12)
    true_labels = targets.argmax(axis=1)
    true_labels[:3] = (true_labels[:3] + 1) % 5  # 9 of 12 agree
    loss, metrics = noisy_student.noisy_student_loss(
        labeled_logits=tf.constant(labeled_logits, tf.float32), labels=tf.constant(labels),
        pseudo_logits=tf.constant(pseudo_logits, tf.float16), targets=tf.constant(targets, tf.float32),
        unlabeled_weight=3.0, pseudo_true_labels=tf.constant(true_labels),
    )
    expected, pseudo = _reference_loss(labeled_logits, labels, np.float16(pseudo_logits), targets, 3.0)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["unlabeled_loss"]), pseudo, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pseudo_label_acc"]), 0.75)


def test_pseudo_labelled_source_copies_each_selected_image_and_numbers_it():
    source = data_lib.get_source("mnist5k")
    split = "train[:20]"
    images = [image for image, _ in source.as_dataset(split, shuffle_files=False).as_numpy_iterator()]
    indices = np.array([1, 4, 4, 4, 7, 19, 19])
    pseudo = noisy_student.PseudoLabeledSource(source, split, indices)
    assert pseudo.num_examples(split) == 7
    for shuffle in (False, True):
        rows = []
        for image, row in pseudo.as_dataset(split, shuffle_files=shuffle, seed=3).as_numpy_iterator():
            example = [1, 4, 7, 19][row]  # row r is the r-th distinct selected example
            np.testing.assert_array_equal(image, images[example])
            rows.append(int(row))
        assert sorted(rows) == [0, 1, 1, 1, 2, 3, 3]


def _round_config(tiny_method_config, teacher, **train):
    return tiny_method_config(
        "noisy_student",
        distill={"teacher_checkpoint": teacher},
        semi={"unlabeled_batch_ratio": 2, "pseudo_label_threshold": 0.0},
        noisy_student={"noisy_student_per_class": 2},
        train={"mode": "train_then_eval", "eval_batch_size": 16, **train},
    )


def test_one_step_loss_against_numpy(tiny_method_config, tiny_classifier_dir, tmp_path):
    config = _round_config(tiny_method_config, tiny_classifier_dir)
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)  # labels the train split first
    selection = noisy_student.Selection.load(str(tmp_path / noisy_student.PSEUDO_LABELS_FILE))
    assert selection.num_examples == 32
    counts = np.bincount(selection.targets.argmax(axis=1), minlength=10)
    assert set(counts.tolist()) <= {0, 2} and counts.sum() == len(selection.indices) > 0  # 2 per predicted class
    # A one-step teacher's probabilities are nearly the same for every image: distinct
    # random targets per row show which row's target each image is trained towards.
    rows = len(selection.distinct()[0])
    targets = np.random.default_rng(0).dirichlet(0.3 * np.ones(10), size=rows).astype(np.float32)
    state.method.targets.assign(targets)
    batch = next(iter(experiment.replica_train_dataset(8)))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["unlabeled_image"].shape == (16, 16, 16, 3)
    weights = state.model.get_weights()
    loss, metrics = state.method(state.model, batch)
    state.model.set_weights(weights)  # batch norm's moving statistics moved in the step
    logits = state.model(tf.concat([batch["image"], batch["unlabeled_image"]], 0), training=True)["logits_sup"]
    expected, _ = _reference_loss(logits[:8], batch["label"].numpy(), logits[8:],
                                  targets[batch["unlabeled_row"].numpy()], 2.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

    # Stopped after labelling, before any checkpoint: a rerun reads the pseudo-labels as they
    # are and never asks the teacher again (here gone).
    labels_file = str(tmp_path / noisy_student.PSEUDO_LABELS_FILE)
    before = _digest(labels_file)
    gone = config.replace(distill={"teacher_checkpoint": str(tmp_path / "no_teacher")})
    again = trainer.build_train_state(Experiment.create(gone, str(tmp_path)))
    assert _digest(labels_file) == before
    np.testing.assert_array_equal(again.method.selection.indices, selection.indices)


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns


class _Killed(Exception):
    pass


def test_pseudo_labels_are_written_atomically(tmp_path, monkeypatch):
    selection = noisy_student.Selection(
        indices=np.array([0, 2, 2]), targets=np.eye(3, dtype=np.float32), true_labels=np.array([0, 1, 1]),
        num_examples=4, kept=2, per_class=2,
    )
    path = str(tmp_path / noisy_student.PSEUDO_LABELS_FILE)

    def killed(*args, **kwargs):
        raise _Killed()

    with monkeypatch.context() as patch:  # killed before the rename: no file a rerun would take as complete
        patch.setattr(noisy_student.tf.io.gfile, "rename", killed)
        with pytest.raises(_Killed):
            selection.save(path)
    assert not os.path.exists(path)
    selection.save(path)
    loaded = noisy_student.Selection.load(path)
    np.testing.assert_array_equal(loaded.indices, selection.indices)
    np.testing.assert_array_equal(loaded.targets, selection.targets)
    assert (loaded.num_examples, loaded.kept, loaded.per_class) == (4, 2, 2)
    assert loaded.stats() == {"examples": 4, "above_threshold": 2, "per_class": 2, "selected": 3, "distinct": 2,
                              "accuracy": 2 / 3}


def test_rounds_run_record_and_resume_after_a_kill(tiny_method_config, tiny_classifier_dir, tmp_path, monkeypatch):
    model_dir = str(tmp_path)
    config = _round_config(tiny_method_config, tiny_classifier_dir, train_steps=2, checkpoint_steps=1)
    config = config.replace(noisy_student={"iterations": 2})
    run = METHODS["noisy_student"].run
    first, second = tmp_path / "round_1", tmp_path / "round_2"
    save = distribute.save_checkpoint

    # Killed in round 2's student, after its checkpoint at step 1 (its pseudo-labels written).
    def save_then_die(manager, step, strategy):
        path = save(manager, step, strategy)
        if manager.directory == str(second) and step == 1:
            raise _Killed()
        return path

    with monkeypatch.context() as patch:
        patch.setattr(trainer.distribute, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run(config, model_dir)
    rounds = json.loads((tmp_path / noisy_student.ROUNDS_FILE).read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["teacher"] == tiny_classifier_dir
    assert rounds[0]["top_1"] == json.loads((first / "result.json").read_text())["eval/label_top_1_accuracy"]
    assert rounds[0]["pseudo_labels"]["selected"] == len(
        noisy_student.Selection.load(str(first / noisy_student.PSEUDO_LABELS_FILE)).indices)
    assert tf.train.latest_checkpoint(str(second)).endswith("ckpt-1")
    finished = sorted((p.name, _digest(p)) for p in first.iterdir() if p.is_file())
    labels_file = second / noisy_student.PSEUDO_LABELS_FILE
    labels_before, step_1_before = _digest(labels_file), _digest(second / "ckpt-1.index")

    # The rerun skips the finished round, keeps round 2's pseudo-labels and continues from step 1.
    result = run(config, model_dir)
    assert result["global_step"] == 2 and tf.train.latest_checkpoint(str(second)).endswith("ckpt-2")
    assert sorted((p.name, _digest(p)) for p in first.iterdir() if p.is_file()) == finished
    assert _digest(labels_file) == labels_before and _digest(second / "ckpt-1.index") == step_1_before
    rounds = json.loads((tmp_path / noisy_student.ROUNDS_FILE).read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["teacher"] == str(first) and rounds[1]["top_1"] == result["eval/label_top_1_accuracy"]
    # Round 1's student taught round 2 through the weights it was evaluated with.
    assert noisy_student.teacher_checkpoint_root(str(first)) == "ema_model"
    assert noisy_student.teacher_checkpoint_root(tiny_classifier_dir) == "model"


def test_flag_errors_name_the_flag(tiny_method_config, tmp_path):
    from simclr_tf.config import validate

    config = tiny_method_config("noisy_student", train={"mode": "train_then_eval"})
    with pytest.raises(FlagError, match="^--teacher_checkpoint"):
        validate(config)
    for section, field, value in (("noisy_student", "iterations", 0), ("noisy_student", "pseudo_label_type", "x"),
                                  ("noisy_student", "noisy_student_per_class", -1)):
        bad = config.replace(distill={"teacher_checkpoint": "t"}, **{section: {field: value}})
        with pytest.raises(FlagError, match=f"^--{field}"):
            validate(bad)
    run = METHODS["noisy_student"].run
    with pytest.raises(FlagError, match="^--mode"):
        run(config.replace(distill={"teacher_checkpoint": str(tmp_path)}, train={"mode": "train"}), str(tmp_path))
    with pytest.raises(FlagError, match="^--teacher_checkpoint"):
        run(config.replace(distill={"teacher_checkpoint": str(tmp_path / "none")}), str(tmp_path / "run"))
