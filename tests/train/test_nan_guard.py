"""NaN/Inf guard: the first bad step is named exactly, its update skipped, nothing saved after it."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment

BATCH = 8
BAD_STEP = 5  # inside the loop of steps 4-6 (checkpoints and logs every 3 steps)


def _experiment(model_dir, strategy=None):
    config = Config.demo().replace(
        model={"resnet_depth": 10, "image_size": 16, "num_proj_layers": 1, "proj_out_dim": 16},
        data={"train_split": "train[:64]", "eval_split": "validation[:16]"},
        train={"mode": "train", "train_steps": 9, "train_batch_size": BATCH, "checkpoint_steps": 3,
               "log_every_steps": 3, "keep_hub_module_max": 0},
        optim={"optimizer": "momentum", "learning_rate": 0.1, "warmup_epochs": 0},
    )
    return Experiment.create(config, str(model_dir), strategy)


def _poison_batches(experiment, replica_batch_index):
    """Makes the training data hold a NaN image in one replica batch (counted over all replicas)."""
    strategy = experiment.strategy
    per_replica = BATCH // strategy.num_replicas_in_sync

    def dataset(start_step=0):
        assert start_step == 0

        def dataset_fn(context):
            ds = experiment.replica_train_dataset(per_replica, context).enumerate()
            return ds.map(lambda i, batch: {
                **batch,
                "image": tf.where(i == replica_batch_index, np.nan, batch["image"]),
            })

        return strategy.distribute_datasets_from_function(dataset_fn)

    experiment.train_dataset = dataset


def _check_stopped_at_bad_step(error, state, model_dir, what):
    message = str(error.value)
    assert any(message.startswith(f"Step {BAD_STEP}: {w} became NaN or Inf") for w in what), message
    assert str(model_dir / "ckpt-3") in message
    # The bad update was skipped: the step count and the weights are those of step 4.
    assert int(state.optimizer.iterations.numpy()) == BAD_STEP - 1
    for variable in state.model.trainable_variables:
        assert np.isfinite(variable.numpy()).all(), variable.path
    # The last good checkpoint is the latest, and nothing was written after the bad step.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-3")
    assert not list(model_dir.glob("ckpt-6*"))


def test_nan_loss_names_the_exact_step_and_keeps_the_last_good_checkpoint(tmp_path):
    experiment = _experiment(tmp_path)
    _poison_batches(experiment, BAD_STEP - 1)
    state = trainer.build_train_state(experiment)
    with pytest.raises(trainer.NonFiniteLossError) as error:
        trainer.train(experiment, state)
    # On one replica batch norm runs fused with the ReLU, which (in oneDNN) turns a NaN into 0
    # in the forward pass: the NaN image may then reach the gradients only.
    _check_stopped_at_bad_step(error, state, tmp_path, ("the loss", "a gradient"))


class NanGradientAt:
    """Wraps a method so that at one step its loss's gradient is NaN while its value stays finite."""

    def __init__(self, method, optimizer, step: int):
        self.method, self.optimizer, self.step = method, optimizer, step

    def __getattr__(self, name):  # every other hook is the method's
        return getattr(self.method, name)

    def __call__(self, model, batch):
        loss, metrics = self.method(model, batch)
        kernel = model.trainable_variables[0]

        def zero_with_nan_gradient():
            # sqrt(|x - x|) is 0, and its derivative 0.5 / sqrt(0) * sign(0) is NaN.
            return tf.reduce_sum(tf.sqrt(tf.abs(kernel - tf.stop_gradient(kernel))))

        # tf.cond differentiates the branch taken only, so other steps stay finite.
        extra = tf.cond(self.optimizer.iterations + 1 == self.step, zero_with_nan_gradient, lambda: 0.0)
        return loss + extra, metrics


def test_nan_gradient_with_a_finite_loss_is_caught_too(tmp_path):
    experiment = _experiment(tmp_path)
    state = trainer.build_train_state(experiment)
    state = dataclasses.replace(state, method=NanGradientAt(state.method, state.optimizer, BAD_STEP))
    with pytest.raises(trainer.NonFiniteLossError) as error:
        trainer.train(experiment, state)
    _check_stopped_at_bad_step(error, state, tmp_path, ("a gradient",))


@pytest.mark.slow
def test_a_nan_on_one_replica_stops_every_replica(tmp_path, two_cpu_strategy):
    experiment = _experiment(tmp_path, two_cpu_strategy)
    # The replicas take the batches in turn: this one is half of step 5.
    _poison_batches(experiment, 2 * (BAD_STEP - 1) + 1)
    state = trainer.build_train_state(experiment)
    with pytest.raises(trainer.NonFiniteLossError) as error:
        trainer.train(experiment, state)
    _check_stopped_at_bad_step(error, state, tmp_path, ("the loss",))
