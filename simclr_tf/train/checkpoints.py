"""Checkpoint creation and restore, in a written priority order.

1. the latest checkpoint in `model_dir` (resume: model, optimizer and step);
2. else `--checkpoint` (initialise the model's weights only, e.g. pretrain -> finetune);
3. else train from scratch.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    source: str  # "model_dir", "checkpoint" or "scratch"
    path: str | None
    step: int


def make_manager(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, model_dir: str, max_to_keep: int
) -> tf.train.CheckpointManager:
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return tf.train.CheckpointManager(checkpoint, directory=model_dir, max_to_keep=max_to_keep)


def restore(
    manager: tf.train.CheckpointManager,
    *,
    init_checkpoint: str | None,
    zero_init_logits_layer: bool = False,
) -> RestoreReport:
    """Restores following the priority order above; returns what was done."""
    checkpoint = manager.checkpoint
    latest = manager.latest_checkpoint
    if latest:
        logging.info("Resuming from %s", latest)
        status = checkpoint.restore(latest)
        # Everything we built must come back, or this is not the run that wrote it.
        status.assert_existing_objects_matched()
        return RestoreReport("model_dir", latest, int(checkpoint.optimizer.iterations.numpy()))
    if init_checkpoint:
        path = resolve_checkpoint_path(init_checkpoint)
        logging.info("Initialising model weights from %s", path)
        status = tf.train.Checkpoint(model=checkpoint.model).restore(path).expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as unmatched:
            logging.warning("Not in %s (kept freshly initialised): %s", path, unmatched)
        model = checkpoint.model
        if zero_init_logits_layer and getattr(model, "supervised_head", None) is not None:
            for variable in model.supervised_head.trainable_weights:
                variable.assign(tf.zeros_like(variable))
            logging.info("Zero-initialised the supervised head (--zero_init_logits_layer)")
        return RestoreReport("checkpoint", path, 0)
    logging.info("No checkpoint in %s and no --checkpoint: training from scratch", manager.directory)
    return RestoreReport("scratch", None, 0)


def resolve_checkpoint_path(path: str) -> str:
    """Accepts a checkpoint prefix or a directory holding checkpoints."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(
                f"--checkpoint={path} is a directory without a checkpoint; pass a checkpoint "
                "prefix such as <model_dir>/ckpt-1000 or a model_dir that holds one."
            )
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"--checkpoint={path}: no such checkpoint ({path}.index is missing). Pass a "
            "checkpoint prefix such as <model_dir>/ckpt-1000 or a model_dir."
        )
    return path
