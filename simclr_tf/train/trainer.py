"""The training loop: many steps per `tf.function` call, then log / summarise / checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import time

from absl import logging
import tensorflow as tf

from simclr_tf import losses
from simclr_tf import optim
from simclr_tf.train import checkpoints
from simclr_tf.train import steps as steps_lib
from simclr_tf.train.experiment import Experiment
from simclr_tf.train.metrics import MeanMetrics, first_non_finite


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the last good checkpoint is kept as the latest."""


@dataclasses.dataclass
class TrainState:
    model: tf.Module
    optimizer: tf.Module
    loss_fn: steps_lib.LossFn  # holds the frozen teacher when distilling
    manager: tf.train.CheckpointManager
    restore_report: checkpoints.RestoreReport


def build_train_state(experiment: Experiment) -> TrainState:
    """Model, optimizer, loss and checkpoint manager, restored by `checkpoints.restore` priority."""
    cfg = experiment.config
    with experiment.strategy.scope():
        model = experiment.build_model()
        schedule = optim.WarmUpAndCosineDecay(
            base_learning_rate=cfg.optim.learning_rate,
            train_batch_size=cfg.train.train_batch_size,
            learning_rate_scaling=cfg.optim.learning_rate_scaling,
            warmup_steps=experiment.warmup_steps,
            total_steps=experiment.train_steps,
        )
        optimizer = optim.build_optimizer(
            cfg.optim.optimizer,
            learning_rate=schedule,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        # Slots must exist before restoring, so the restore can be checked in full.
        optimizer.build(model.trainable_variables)
    # Only the trained model and its optimizer are checkpointed, never a teacher.
    manager = checkpoints.make_manager(model, optimizer, experiment.model_dir, cfg.train.keep_checkpoint_max)
    report = checkpoints.restore(
        manager,
        init_checkpoint=cfg.train.checkpoint,
        zero_init_logits_layer=cfg.model.zero_init_logits_layer,
    )
    return TrainState(model, optimizer, experiment.loss_fn(), manager, report)


def train(experiment: Experiment, state: TrainState | None = None) -> TrainState:
    """Trains until `experiment.train_steps`; returns the final state."""
    cfg = experiment.config
    strategy = experiment.strategy
    state = state or build_train_state(experiment)
    model, optimizer, loss_fn = state.model, state.optimizer, state.loss_fn
    with strategy.scope():
        metrics = MeanMetrics(loss_fn.metric_names(model), prefix="train")
    step_fn = functools.partial(
        steps_lib.train_step,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        decayed_variables=losses.variables_with_loss_weight_decay(
            model.trainable_variables, cfg.optim.optimizer
        ),
        weight_decay=cfg.optim.weight_decay,
        num_replicas=strategy.num_replicas_in_sync,
    )

    def replica_step(batch):
        metrics.update(step_fn(batch))

    @tf.function
    def run_steps(iterator, num_steps):
        # tf.range keeps this a graph loop instead of unrolling num_steps copies.
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))

    step = int(optimizer.iterations.numpy())
    if step >= experiment.train_steps:
        logging.info("Already at step %d of %d: nothing to train", step, experiment.train_steps)
        return state

    writer = tf.summary.create_file_writer(experiment.model_dir)
    with writer.as_default():
        tf.summary.image(
            "train/augmented_views", experiment.augmented_examples(), step=step, max_outputs=8
        )
    iterator = iter(experiment.train_dataset())
    progress = Progress(step, experiment.train_steps, cfg.train.train_batch_size)
    while step < experiment.train_steps:
        num_steps = steps_until_next_event(
            step, experiment.train_steps, cfg.train.log_every_steps, experiment.checkpoint_steps
        )
        run_steps(iterator, tf.constant(num_steps))
        step = int(optimizer.iterations.numpy())
        values = metrics.results()
        metrics.reset()
        bad = first_non_finite(values)
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} became {values[bad]} by step {step}; stopped without saving, so the "
                f"latest checkpoint in {experiment.model_dir} is the last good one. Lower "
                "--learning_rate or check the input data."
            )
        learning_rate = float(optimizer.learning_rate)
        speed = progress.update(step)
        logging.info(
            "step %d/%d | loss %.4f | %s | lr %.4g | %.2f steps/s | %.1f images/s | ETA %s",
            step,
            experiment.train_steps,
            values["train/total_loss"],
            " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items() if k != "train/total_loss"),
            learning_rate,
            speed.steps_per_second,
            speed.images_per_second,
            speed.eta,
        )
        with writer.as_default():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)
            tf.summary.scalar("learning_rate", learning_rate, step=step)
            tf.summary.scalar("train/images_per_second", speed.images_per_second, step=step)
        if step % experiment.checkpoint_steps == 0 or step >= experiment.train_steps:
            path = state.manager.save(checkpoint_number=step)
            logging.info("Saved %s", path)
        writer.flush()
    writer.close()
    logging.info("Training complete at step %d", step)
    return state


def steps_until_next_event(step: int, total: int, log_every: int, checkpoint_every: int) -> int:
    """Steps to run before the next log line, checkpoint or the end, whichever is first."""
    def until(every: int) -> int:
        return every - step % every if every > 0 else total - step

    return max(1, min(total - step, until(log_every), until(checkpoint_every)))


@dataclasses.dataclass
class Speed:
    steps_per_second: float
    images_per_second: float
    eta: str


class Progress:
    """Throughput since the last update and a time-left estimate."""

    def __init__(self, start_step: int, total_steps: int, global_batch_size: int):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def update(self, step: int) -> Speed:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_second = (step - self._last_step) / elapsed
        self._last_step, self._last_time = step, now
        remaining = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else 0.0
        return Speed(steps_per_second, steps_per_second * self.global_batch_size, format_duration(remaining))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
