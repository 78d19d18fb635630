"""`train_and_evaluate(config, model_dir)`: what `run.py` calls, and notebooks and tests too."""

from __future__ import annotations

import contextlib
import re

from absl import logging
import keras
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf.config import Config
from simclr_tf.train import checkpoints
from simclr_tf.train import evaluation
from simclr_tf.train import hparams
from simclr_tf.train import model_dir_lock
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment, save_config

_CHECKPOINT_STEP = re.compile(r"ckpt-(\d+)$")


def train_and_evaluate(
    config: Config, model_dir: str, strategy: tf.distribute.Strategy | None = None
) -> dict[str, float] | None:
    """Runs `config.train.mode` in `model_dir`; returns the last eval result, if any.

    Training holds model_dir's lock (`model_dir_lock`); a SIGTERM while training saves a
    checkpoint and raises `preemption.Preempted`.
    """
    with model_dir_lock_for(config, model_dir, strategy):
        return _train_and_evaluate(config, model_dir, strategy)


def model_dir_lock_for(
    config: Config, model_dir: str, strategy: tf.distribute.Strategy | None = None
) -> contextlib.AbstractContextManager:
    """The lock a run of `config` holds on model_dir: training runs' chief only, never eval."""
    if config.train.mode == "eval":
        return contextlib.nullcontext()
    chief = distribute.is_chief(strategy) if strategy else distribute.writes_model_dir(config.runtime)
    return model_dir_lock.hold(model_dir) if chief else contextlib.nullcontext()


def _train_and_evaluate(
    config: Config, model_dir: str, strategy: tf.distribute.Strategy | None
) -> dict[str, float] | None:
    experiment = Experiment.create(config, model_dir, strategy)
    save_config(config, model_dir)
    hparams.write_session(config, model_dir, experiment.strategy)  # TensorBoard's HParams tab
    mode = config.train.mode
    if mode == "eval" and config.train.checkpoint and not tf.train.latest_checkpoint(model_dir):
        return evaluate_checkpoint(experiment, config.train.checkpoint)
    if mode == "eval":
        return evaluate_continuously(experiment)
    state = trainer.train(experiment)
    if mode == "train_then_eval":
        model = state.method.eval_model(state.model)  # e.g. the weight average (--eval_with_ema)
        return evaluation.evaluate(experiment, model, int(state.optimizer.iterations.numpy()))
    return None


def evaluate_continuously(experiment: Experiment, timeout_secs: float | None = None) -> dict | None:
    """Evaluates each new checkpoint in model_dir until one reaches the final step.

    A new checkpoint that cannot be read is skipped with a warning (and left in place: the
    trainer owns the directory) for the newest older one that reads, if not evaluated yet.
    """
    with experiment.strategy.scope():
        model = experiment.build_model()
    result, evaluated = None, None
    for latest in tf.train.checkpoints_iterator(
        experiment.model_dir, min_interval_secs=15, timeout=timeout_secs
    ):
        path = checkpoints.readable_checkpoint_at_or_before(experiment.model_dir, latest)
        if path != evaluated:
            step = restore_model_for_eval(model, path, experiment.method.eval_checkpoint_root())
            result = evaluation.evaluate(experiment, model, step)
            evaluated = path
        # Judged by the newest checkpoint, readable or not: a finished run saves no more.
        if checkpoint_step(latest) >= experiment.train_steps:
            logging.info("The final step's checkpoint is in (evaluated %s); done", path)
            break
    return result


def evaluate_checkpoint(experiment: Experiment, checkpoint: str) -> dict:
    """Evaluates `--checkpoint` once (e.g. a converted released model) when model_dir has none.

    Every variable of the evaluated model must come from it, the projection layers the
    classifier reads (--ft_proj_selector) included; projection layers it holds beyond
    those this mode builds are not used.
    """
    path = checkpoints.resolve_checkpoint_path(checkpoint)
    with experiment.strategy.scope():
        model = experiment.build_model()
    checkpoints.restore_model_weights(model, path, exact=False, required_prefixes=(f"{checkpoints.MODEL_ROOT}/",))
    match = _CHECKPOINT_STEP.search(path)
    return evaluation.evaluate(experiment, model, int(match.group(1)) if match else 0)


def restore_model_for_eval(model: keras.Model, path: str, checkpoint_root: str = checkpoints.MODEL_ROOT) -> int:
    """Restores the model's weights (all of them, or fails) and returns the checkpoint's step.

    `checkpoint_root`: which model of the checkpoint, e.g. the weight average a method keeps.
    """
    checkpoints.restore_model_weights(model, path, exact=True, checkpoint_root=checkpoint_root)
    return checkpoint_step(path)


def checkpoint_step(path: str) -> int:
    match = _CHECKPOINT_STEP.search(path)
    if match is None:
        raise ValueError(f"Cannot read the step from checkpoint name {path} (expected ckpt-<step>)")
    return int(match.group(1))
