"""The semi-supervised train modes end to end: steps, EMA, checkpoints, resume, label hygiene.

The losses themselves are checked against NumPy in the per-method test files; here the
real pieces run (`Experiment`, `trainer`, the data pipeline) on tiny models and the
embedded digits.
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import models
from simclr_tf.config import Config
from simclr_tf.methods.ema import WeightAverage
from simclr_tf.methods.registry import METHODS
from simclr_tf.train import checkpoints, train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment

MODES = config_lib.SEMI_SUPERVISED_MODES
# semivit fine-tunes a classifier: its step from one is in tests/methods/test_semivit.py.
FROM_SCRATCH = [m for m in MODES if m not in config_lib.SEMI_SUPERVISED_FROM_CHECKPOINT_MODES]
BATCH = 4  # labeled; unlabeled: 2 x 4


def tiny_config(train_mode: str, **sections) -> Config:
    """ResNet-10 x0.25 at 16 px, 4 labeled + 8 unlabeled digits a step, 2 steps."""
    config = Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 2},
        data={"dataset": "mnist5k", "train_split": "train[:48]", "eval_split": "validation[:16]",
              "labeled_per_class": 1},
        optim={"optimizer": "lars", "learning_rate": 1.0, "warmup_epochs": 0},
        train={"train_mode": train_mode, "mode": "train", "train_steps": 2, "train_batch_size": BATCH,
               "eval_batch_size": 16, "log_every_steps": 1, "checkpoint_steps": 1,
               "keep_hub_module_max": 0, "knn_eval": False, "linear_probe_eval": False},
        semi={"unlabeled_batch_ratio": 2, "pseudo_label_threshold": low_threshold(train_mode), "ema_decay": 0.5},
    )
    return config.replace(**sections)


def low_threshold(train_mode: str) -> float | None:
    """A threshold that keeps the pseudo-labels of an untrained model, where the method has one."""
    method = METHODS[train_mode]
    return None if "pseudo_label_threshold" in getattr(method, "unused_flags", ("pseudo_label_threshold",)) else 0.1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A pretraining run's model_dir (one step), to start the methods from."""
    model_dir = tmp_path_factory.mktemp("pretrain")
    config = tiny_config("pretrain", train={"train_mode": "pretrain", "train_steps": 1, "train_batch_size": 8,
                                            "mode": "train", "keep_hub_module_max": 0, "knn_eval": False})
    train_and_evaluate(config, str(model_dir))
    return str(model_dir)


def test_every_train_mode_has_a_method():
    assert set(METHODS) == set(config_lib.TRAIN_MODES)
    assert all(METHODS[name].name == name for name in METHODS)


@pytest.mark.parametrize("train_mode", MODES)
def test_a_step_from_a_pretraining_checkpoint_then_eval_of_the_average(train_mode, pretrained, tmp_path):
    config = tiny_config(train_mode, train={"checkpoint": pretrained, "mode": "train_then_eval", "train_steps": 1})
    result = train_and_evaluate(config, str(tmp_path))
    assert result["global_step"] == 1 and 0 <= result["eval/label_top_1_accuracy"] <= 1
    # What users of these methods watch, per logged step.
    tags = set()
    for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    pseudo_labelling = train_mode in ("fixmatch", "uda", "debiasmatch", "dst", "mpl", "semivit")
    watched = {"train/mask_rate", "train/pseudo_label_acc", "train/pseudo_label_class_fraction"}
    assert watched <= tags if pseudo_labelling else not watched & tags
    assert {"train/supervised_loss", "train/total_loss"} <= tags

    # Saved: the model, its average and the method's own state.
    path = tf.train.latest_checkpoint(str(tmp_path))
    extra = {"debiasmatch": ["debiasmatch"], "dst": ["dst_heads"], "s4l": ["rotation_head"], "mpl": ["mpl_teacher"]}
    for root in ["model", "ema_model", *extra.get(train_mode, [])]:
        # By object path: TF keys a tensor by one of its paths, often the optimizer's.
        assert checkpoints.checkpoint_variables_by_path(path, root), root
    # --mode=eval of this model_dir evaluates the average (--eval_with_ema), in full.
    experiment = Experiment.create(config.replace(train={"mode": "eval"}), str(tmp_path))
    assert experiment.method.eval_checkpoint_root() == "ema_model"
    model = experiment.build_model()
    checkpoints.restore_model_weights(model, path, exact=True, checkpoint_root="ema_model")
    reader = tf.train.load_checkpoint(path)
    keys = checkpoints.checkpoint_variables_by_path(path, "ema_model")
    for name, variable in checkpoints.model_variables_by_path(model).items():
        saved = reader.get_tensor(keys["ema_model" + name[len("model"):]][0])
        np.testing.assert_array_equal(variable.numpy(), saved, err_msg=name)


@pytest.mark.parametrize("train_mode", FROM_SCRATCH)
def test_a_step_from_scratch_never_reads_unlabeled_labels_and_moves_the_average(train_mode, tmp_path):
    experiment = Experiment.create(tiny_config(train_mode), str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "scratch"
    method, model = state.method, state.model
    # A fresh run's average starts at the weights.
    for average, weight in zip(method.average.model.weights, model.weights):
        np.testing.assert_array_equal(average.numpy(), weight.numpy())

    batch = next(iter(experiment.replica_train_dataset(BATCH)))
    assert batch["unlabeled_label"].shape == (2 * BATCH,)
    # The loss is the same with the unlabeled images' labels corrupted (same weights and
    # statistics: only the labels differ). tests/methods/test_method_losses_contract.py
    # checks the same of each loss function alone, and that monitoring does read them.
    corrupted = dict(batch, unlabeled_label=(batch["unlabeled_label"] + 3) % 10)
    weights = model.get_weights()
    state_before = [v.numpy() for v in _method_state(method)]
    loss, _ = method(model, batch)
    model.set_weights(weights)
    for variable, value in zip(_method_state(method), state_before):
        variable.assign(value)
    corrupted_loss, _ = method(model, corrupted)
    assert float(loss) == float(corrupted_loss)
    model.set_weights(weights)

    # One update, then the average: decay 0.5 puts it halfway. Eagerly: the test above
    # runs each mode's step traced, inside the training loop.
    before = [w.numpy().copy() for w in model.trainable_weights]
    values = trainer.make_train_step(experiment, state)(batch)
    method.after_update(model)
    assert np.isfinite(float(values["total_loss"]))
    after = [w.numpy() for w in model.trainable_weights]
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0
    for average, start, end in zip(method.average.model.trainable_weights, before, after):
        np.testing.assert_allclose(average.numpy(), 0.5 * start + 0.5 * end, rtol=1e-5, atol=1e-6)
    extra = method.extra_trainable_variables()
    assert bool(extra) == (train_mode in ("dst", "s4l", "mpl"))  # mpl: its teacher


def _method_state(method) -> list:
    """Non-weight state a loss call updates (DebiasMatch's running mean)."""
    state = getattr(method, "state", None)
    return list(state.variables) if state is not None else []


@pytest.mark.slow
def test_resume_continues_with_the_same_batches_and_average(tmp_path):
    config = tiny_config("fixmatch")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    experiment = Experiment.create(config, str(straight_dir))
    straight = list(experiment.replica_train_dataset(BATCH).take(2).as_numpy_iterator())
    resumed = next(experiment.replica_train_dataset(BATCH, start_step=1).as_numpy_iterator())
    for key in straight[1]:
        np.testing.assert_array_equal(resumed[key], straight[1][key], err_msg=key)

    # Weights and average after 2 steps equal those of 1 step, a restart, then 1 more.
    straight_run = _run(config, straight_dir, steps=2, weights=None)
    _run(config, resumed_dir, steps=1, weights=straight_run["start"])
    resumed_run = _run(config, resumed_dir, steps=2, weights=None)
    assert resumed_run["source"] == "model_dir"
    for name in ("model", "average"):
        for a, b in zip(straight_run[name], resumed_run[name]):
            # float32 reductions may run in another order in the resumed process's
            # kernels: ~1e-6 here, where a different batch moves weights by ~1e-2.
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5, err_msg=name)


def _run(config: Config, model_dir, steps: int, weights) -> dict:
    config = config.replace(train={"train_steps": steps})
    experiment = Experiment.create(config, str(model_dir))
    state = trainer.build_train_state(experiment)
    if weights is not None:
        state.model.set_weights(weights)
        state.method.average.copy_from(state.model)
    start = state.model.get_weights()
    trainer.train(experiment, state)
    return {
        "start": start,
        "source": state.restore_report.source,
        "model": [w.numpy() for w in state.model.weights],
        "average": [w.numpy() for w in state.method.average.model.weights],
    }


def test_weight_average_matches_numpy():
    config = config_lib.ModelConfig(resnet_depth=10, width_multiplier=0.25, image_size=16, num_proj_layers=1)

    def build():
        return models.build_model(config, num_classes=3, drop_unused_projection_layers=True)

    model = build()
    average = WeightAverage(build, decay=0.9)
    average.copy_from(model)
    expected = [w.numpy() for w in model.weights]
    rng = np.random.default_rng(0)
    for _ in range(3):
        for w in model.weights:
            w.assign(rng.normal(size=w.shape).astype("float32"))
        average.update(model)
        expected = [0.9 * e + 0.1 * w.numpy() for e, w in zip(expected, model.weights)]
    for got, want in zip(average.model.weights, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(build, decay=1.0)


def test_each_method_has_its_papers_defaults_and_refuses_flags_it_ignores(tmp_path):
    def method(train_mode, **semi):
        config = tiny_config(train_mode, semi={"unlabeled_batch_ratio": None, "pseudo_label_threshold": None, **semi})
        return Experiment.create(config, str(tmp_path / train_mode)).method

    fixmatch, debias, s4l, teacher = method("fixmatch"), method("debiasmatch"), method("s4l"), method("mean_teacher")
    assert (fixmatch.pseudo_label_threshold, fixmatch.unlabeled_loss_weight) == (0.95, 1.0)
    assert (debias.pseudo_label_threshold, debias.unlabeled_loss_weight) == (0.8, 10.0)
    assert teacher.unlabeled_loss_weight == 50.0
    assert fixmatch.examples_per_step(fixmatch.config) == 7 * BATCH
    assert s4l.examples_per_step(s4l.config) == BATCH and s4l.images_per_step(s4l.config) == 2 * BATCH
    assert method("fixmatch", pseudo_label_threshold=0.5, unlabeled_loss_weight=2.0).unlabeled_loss_weight == 2.0
    for train_mode, flag in (("s4l", "unlabeled_loss_weight"), ("uda", "pseudo_label_threshold"),
                             ("mean_teacher", "pseudo_label_threshold")):
        with pytest.raises(config_lib.FlagError, match=f"--{flag}: --train_mode={train_mode} does not use it"):
            method(train_mode, **{flag: 0.5})


@pytest.mark.parametrize("train_mode", ["fixmatch", "mean_teacher"])
def test_a_mixed_bfloat16_step_stays_finite_and_averages_in_float32(train_mode, tmp_path):
    config = tiny_config(train_mode, train={"train_steps": 1}, runtime={"precision": "mixed_bfloat16"})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    trainer.train(experiment, state)
    assert int(state.optimizer.iterations.numpy()) == 1
    average = state.method.average.model
    assert average.dtype_policy.compute_dtype == "bfloat16"  # the teacher runs in it too
    assert {w.dtype for w in average.weights} == {"float32"}
    assert all(np.isfinite(w.numpy()).all() for w in average.weights)
