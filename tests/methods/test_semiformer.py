"""`--train_mode=semiformer`: the cross-branch pseudo-label loss against NumPy, the step's
teacher (the conv head, inference mode, no gradient), one run from scratch with evaluation
of both heads and the fused prediction, and resuming it."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import FlagError
from simclr_tf.methods import semiformer
from simclr_tf.models import vit as vit_lib
from simclr_tf.models.vit import VIT_SIZES
from simclr_tf.train import train_and_evaluate
from simclr_tf.train.experiment import Experiment

B, U, C = 4, 8, 5


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _numpy_loss(labeled_conv, labeled_transformer, labels, weak_conv, strong_conv, strong_transformer,
                threshold, weight):
    def ce(logits, targets):
        return -_log_softmax(logits)[np.arange(len(targets)), targets]

    probs = np.exp(_log_softmax(weak_conv))
    mask = (probs.max(axis=-1) >= threshold).astype(np.float32)
    targets = probs.argmax(axis=-1)
    supervised = (ce(labeled_conv, labels).mean() + ce(labeled_transformer, labels).mean()) / 2
    unlabeled = ((mask * ce(strong_conv, targets)).mean() + (mask * ce(strong_transformer, targets)).mean()) / 2
    return supervised + weight * unlabeled, mask, targets


def test_loss_matches_numpy_and_no_gradient_reaches_the_teacher_logits():
    rng = np.random.default_rng(0)
    f = lambda n: (2.0 * rng.normal(size=(n, C))).astype(np.float32)  # noqa: E731
    labeled_conv, labeled_transformer, weak, strong_conv, strong_transformer = f(B), f(B), f(U), f(U), f(U)
    labels, true_unlabeled = rng.integers(0, C, size=B), rng.integers(0, C, size=U)
    tensors = [tf.constant(x) for x in (labeled_conv, labeled_transformer, weak, strong_conv, strong_transformer)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tensors)
        loss, metrics = semiformer.semiformer_loss(
            labeled_conv_logits=tensors[0], labeled_transformer_logits=tensors[1], labels=labels,
            weak_conv_logits=tensors[2], strong_conv_logits=tensors[3], strong_transformer_logits=tensors[4],
            threshold=0.5, unlabeled_weight=3.0, unlabeled_labels=true_unlabeled)
    expected, mask, targets = _numpy_loss(labeled_conv, labeled_transformer, labels, weak, strong_conv,
                                          strong_transformer, 0.5, 3.0)
    assert 0 < mask.sum() < U  # some rows kept, some masked
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["mask_rate"]) == pytest.approx(mask.mean())
    hits = (targets == true_unlabeled) * mask
    assert float(metrics["pseudo_label_acc"]) == pytest.approx(hits.sum() / mask.sum())
    fused_hits = ((labeled_conv + labeled_transformer).argmax(-1) == labels).mean()
    assert float(metrics["supervised_acc"]) == pytest.approx(fused_hits)
    # The teacher's logits are constants; both heads' strong views learn from them.
    assert tape.gradient(loss, tensors[2]) is None
    for strong in tensors[3:]:
        assert np.abs(tape.gradient(loss, strong).numpy()).max() > 0
    # Rows below the threshold contribute nothing to the unlabeled term.
    dropped = tape.gradient(metrics["unlabeled_loss_transformer"], tensors[4]).numpy()[mask == 0]
    np.testing.assert_array_equal(dropped, 0.0)


class _FakeModel:
    """Logits that differ per head and per mode, so the test sees which the step reads."""

    def __call__(self, images, training=False):
        x = tf.reduce_mean(images, axis=[1, 2])  # (N, 3)
        base = tf.concat([x, x[:, :2] * 2.0], axis=1) * 20.0  # (N, C)
        # In inference mode the conv head's argmax moves to class 0; the heads' argmaxes differ.
        shift = 0.0 if training else 1.0
        conv = base + shift * tf.constant([15.0, 0, 0, 0, 0])
        return {"logits_sup_conv": conv, "logits_sup_transformer": tf.roll(base, 2, axis=1)}


@pytest.fixture
def micro_vit(monkeypatch):
    monkeypatch.setitem(VIT_SIZES, "tiny", vit_lib.VitSize(hidden_dim=16, num_layers=4, num_heads=2, mlp_dim=32))


def _config(tiny_method_config, **train):
    return tiny_method_config(
        "semiformer",
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 2, "patch_size": 4},
        semi={"unlabeled_batch_ratio": 1, "pseudo_label_threshold": 0.3},
        train={"mode": "train_then_eval", "checkpoint_steps": 1, **train},
    )


def test_the_step_labels_with_the_conv_head_in_inference_mode(tiny_method_config, tmp_path):
    method = Experiment.create(_config(tiny_method_config), str(tmp_path)).method
    rng = np.random.default_rng(1)
    images = lambda n: tf.constant(rng.uniform(size=(n, 16, 16, 3)).astype(np.float32))  # noqa: E731
    weak, strong = images(B), images(B)
    batch = {"image": images(B), "label": tf.constant(rng.integers(0, C, size=B)),
             "unlabeled_image": tf.concat([weak, strong], 0), "unlabeled_label": tf.zeros([B], tf.int64)}
    loss, metrics = method(_FakeModel(), batch)
    fake = _FakeModel()
    train = fake(tf.concat([batch["image"], strong], 0), training=True)
    expected, _, _ = _numpy_loss(
        train["logits_sup_conv"].numpy()[:B], train["logits_sup_transformer"].numpy()[:B], batch["label"].numpy(),
        fake(weak, training=False)["logits_sup_conv"].numpy(), train["logits_sup_conv"].numpy()[B:],
        train["logits_sup_transformer"].numpy()[B:], 0.3, 4.0)  # 4.0: Semiformer's default weight
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["mask_rate"]) == 1.0  # every pseudo-label counts: the loss compares them all
    assert set(method.metric_names(None)) <= set(metrics)


def test_flags_it_cannot_train_with_are_refused(tiny_method_config, tmp_path):
    for model, flag in (({"backbone": "vit"}, "--backbone"), ({"patch_size": 3}, "--patch_size"),
                        ({"fine_tune_after_block": 2}, "--fine_tune_after_block")):
        config = _config(tiny_method_config).replace(model=model)
        with pytest.raises(FlagError, match=flag):
            Experiment.create(config, str(tmp_path / flag[2:]))


def test_a_run_from_scratch_resumes_and_reports_both_heads_and_the_fused_prediction(
    micro_vit, tiny_method_config, tmp_path
):
    # One step, then a second run resumes it, trains a step and evaluates.
    assert train_and_evaluate(_config(tiny_method_config, train_steps=1, mode="train"), str(tmp_path)) is None
    result = train_and_evaluate(_config(tiny_method_config, train_steps=2), str(tmp_path))
    with open(os.path.join(tmp_path, "result.json")) as f:
        on_disk = json.load(f)
    assert on_disk == result and result["global_step"] == 2
    for suffix in ("", "_conv", "_transformer"):
        assert 0 <= result[f"eval/label_top_1_accuracy{suffix}"] <= result[f"eval/label_top_5_accuracy{suffix}"] <= 1
    tags, loss_steps = set(), []
    for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
            loss_steps += [event.step for value in event.summary.value if value.tag == "train/total_loss"]
    assert sorted(loss_steps) == [1, 2]  # resumed: step 1 was not trained again
    assert {"train/mask_rate", "train/pseudo_label_acc", "train/pseudo_label_class_fraction",
            "train/unlabeled_loss_transformer", "eval/label_top_1_accuracy_transformer"} <= tags
