"""The training loop: many steps per `tf.function` call, then log / summarise / checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from absl import logging
import keras
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf import export
from simclr_tf import losses
from simclr_tf import optim
from simclr_tf.methods.base import Method
from simclr_tf.train import checkpoints
from simclr_tf.train import preemption
from simclr_tf.train import steps as steps_lib
from simclr_tf.train.experiment import Experiment
from simclr_tf.train.metrics import MeanMetrics, first_non_finite


class NonFiniteLossError(FloatingPointError):
    """A step's loss or gradients were NaN/Inf; its update was skipped and nothing saved after it."""


@dataclasses.dataclass
class TrainState:
    model: tf.Module
    optimizer: tf.Module
    method: Method  # the train mode: its loss and its own state (teacher, EMA, heads)
    manager: tf.train.CheckpointManager
    restore_report: checkpoints.RestoreReport

    def trainable_variables(self) -> list:
        return self.model.trainable_variables + self.method.extra_trainable_variables()


def build_train_state(experiment: Experiment) -> TrainState:
    """Model, optimizer, method state and checkpoint manager, restored by `checkpoints.restore` priority."""
    cfg = experiment.config
    method = experiment.method
    with experiment.strategy.scope():
        model = method.build_model()
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
        if cfg.runtime.precision == "mixed_float16":
            # float16 gradients underflow without loss scaling; `train_step` scales the loss.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        method.setup(model, optimizer)
        # Slots must exist before restoring, so the restore can be checked in full.
        optimizer.build(model.trainable_variables + method.extra_trainable_variables())
    # The trained model, its optimizer and the method's own state (never a frozen teacher).
    manager = checkpoints.make_manager(
        model, optimizer, experiment.model_dir, cfg.train.keep_checkpoint_max, extra=method.checkpoint_items()
    )
    report = checkpoints.restore(
        manager,
        init_checkpoint=cfg.train.checkpoint,
        zero_init_logits_layer=cfg.model.zero_init_logits_layer,
        # Only the process that writes model_dir's checkpoints moves damaged ones aside.
        set_aside=distribute.is_chief(experiment.strategy),
    )
    method.after_restore(model, report)
    return TrainState(model, optimizer, method, manager, report)


def train(experiment: Experiment, state: TrainState | None = None) -> TrainState:
    """Trains until `experiment.train_steps`; returns the final state."""
    cfg = experiment.config
    strategy = experiment.strategy
    state = state or build_train_state(experiment)
    model, optimizer = state.model, state.optimizer
    metrics, run_steps = make_training_loop(experiment, state)

    step = int(optimizer.iterations.numpy())
    if step >= experiment.train_steps:
        logging.info("Already at step %d of %d: nothing to train", step, experiment.train_steps)
        return state

    writer = distribute.summary_writer(experiment.model_dir, strategy)
    with writer.as_default():
        tf.summary.image(
            "train/augmented_views", experiment.augmented_examples(), step=step, max_outputs=8
        )
    if step:
        logging.info(
            "Resuming at step %d: the training data continues in epoch %d",
            step, step * state.method.examples_per_step(cfg) // experiment.num_train_examples,
        )
    iterator = iter(experiment.train_dataset(start_step=step))
    progress = Progress(step, experiment.train_steps, state.method.images_per_step(cfg))
    call_length = preemption.CallLength()
    agree = preemption.Agreement(strategy)
    with preemption.SigtermFlag() as sigterm:
        while step < experiment.train_steps:
            num_steps = min(call_length.steps, steps_until_next_event(
                step, experiment.train_steps, cfg.train.log_every_steps, experiment.checkpoint_steps
            ))
            started = time.perf_counter()
            bad_step = int(run_steps(iterator, tf.constant(num_steps)))
            step = int(optimizer.iterations.numpy())
            if bad_step >= 0:
                raise NonFiniteLossError(non_finite_message(bad_step, metrics.results(), state.manager))
            next_steps = call_length.update(num_steps, time.perf_counter() - started)
            preempted, call_length.steps = agree(sigterm.received, next_steps)
            # At the last step the run saves and exports as usual.
            preempted = preempted and step < experiment.train_steps
            if not (preempted or is_event(step, experiment.train_steps, cfg.train.log_every_steps,
                                          experiment.checkpoint_steps)):
                continue
            log_and_summarize(experiment, state, metrics, progress, writer, step)
            path = None
            if preempted or step % experiment.checkpoint_steps == 0 or step >= experiment.train_steps:
                path = distribute.save_checkpoint(state.manager, step, strategy)
                if path:
                    logging.info("Saved %s", path)
            writer.flush()
            if preempted:
                writer.close()
                message = preempted_message(step, path, sigterm.received)
                logging.warning(message)
                # No SavedModel export and no evaluation: the run is not finished.
                raise preemption.Preempted(message, step, path)
    writer.close()
    logging.info("Training complete at step %d", step)
    if distribute.is_chief(strategy):  # <model_dir>/saved_model/<step>/, as the original
        export.export_step(
            state.method.eval_model(model), experiment.model_dir, step, keep_max=cfg.train.keep_hub_module_max
        )
    return state


def log_and_summarize(
    experiment: Experiment,
    state: TrainState,
    metrics: MeanMetrics,
    progress: "Progress",
    writer: tf.summary.SummaryWriter,
    step: int,
) -> None:
    """Logs and summarises the metrics since the last call; raises if one is not finite."""
    values = metrics.results()
    vectors = metrics.vector_results()
    metrics.reset()
    bad = first_non_finite(values)
    if bad is not None:
        raise NonFiniteLossError(
            f"{bad} became {values[bad]} by step {step}; stopped without saving, so the "
            f"latest checkpoint in {experiment.model_dir} is the last good one. Lower "
            "--learning_rate or check the input data."
        )
    learning_rate = float(state.optimizer.learning_rate)
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
        for name, value in vectors.items():
            # A distribution over indices (e.g. the classes of the pseudo-labels): one
            # bucket per index in TensorBoard's histogram and distribution tabs.
            tf.summary.histogram(name, index_samples(value), step=step, buckets=len(value))
        tf.summary.scalar("learning_rate", learning_rate, step=step)
        tf.summary.scalar("train/images_per_second", speed.images_per_second, step=step)


def index_samples(fractions, samples: int = 10_000) -> tf.Tensor:
    """Index i repeated in proportion to fractions[i], for a histogram of that distribution."""
    counts = tf.cast(tf.round(tf.convert_to_tensor(fractions, tf.float32) * samples), tf.int32)
    return tf.repeat(tf.range(len(fractions), dtype=tf.float32), tf.maximum(counts, 0))


def preempted_message(step: int, path: str | None, signalled_here: bool) -> str:
    where = "SIGTERM" if signalled_here else "SIGTERM on another worker"
    saved = f"saved {path}" if path else "the chief saved its checkpoint"
    return f"Preempted ({where}) at step {step}: {saved}; run the same command to resume"


def make_training_loop(experiment: Experiment, state: TrainState) -> tuple[MeanMetrics, Callable]:
    """The metrics the loop accumulates, and `run_steps(iterator, num_steps)`, a tf.function.

    `run_steps` runs up to num_steps steps and returns the first non-finite step's number,
    else -1 (that step's update was skipped, on every replica).
    """
    strategy, optimizer = experiment.strategy, state.optimizer
    method = state.method
    with strategy.scope():
        metrics = MeanMetrics(
            method.metric_names(state.model) + steps_lib.STEP_METRICS,
            prefix="train",
            vector_sizes=method.vector_metric_sizes(),
        )
    step_fn = make_train_step(experiment, state)

    def replica_step(batch):
        values = step_fn(batch)
        metrics.update(values)
        return values[steps_lib.FINITE]

    # Graph control flow written out: without AutoGraph's source conversion of every
    # function the step calls, tracing takes seconds less at each start.
    @tf.function(autograph=False)
    def run_steps(iterator, num_steps):
        def more(done, bad_step):
            return tf.logical_and(done < tf.cast(num_steps, tf.int64), bad_step < 0)

        def one_step(done, bad_step):
            finite = strategy.run(replica_step, args=(next(iterator),))

            def after_good_step():
                method.after_update(state.model)
                return tf.constant(-1, tf.int64)

            # `finite` is the same on every replica; a bad step stops the loop.
            bad_step = tf.cond(
                strategy.experimental_local_results(finite)[0],
                after_good_step,
                lambda: optimizer.iterations + 1,
            )
            return done + 1, bad_step

        _, bad_step = tf.while_loop(
            more, one_step, (tf.constant(0, tf.int64), tf.constant(-1, tf.int64))
        )
        return bad_step

    return metrics, run_steps


def make_train_step(experiment: Experiment, state: TrainState) -> Callable[[steps_lib.Batch], steps_lib.Metrics]:
    """This run's per-replica `steps.train_step`, XLA-compiled with --jit_compile."""
    cfg = experiment.config
    extra_variables = state.method.extra_trainable_variables()
    decayed_variables = losses.variables_with_loss_weight_decay(
        state.trainable_variables(), cfg.optim.optimizer
    )

    # A closure, not functools.partial: tf.function would trace a partial's bound
    # arguments (lists of Keras variables) as inputs, which fails inside strategy.run.
    def step_fn(batch: steps_lib.Batch) -> steps_lib.Metrics:
        return steps_lib.train_step(
            batch,
            model=state.model,
            optimizer=state.optimizer,
            loss_fn=state.method,
            decayed_variables=decayed_variables,
            weight_decay=cfg.optim.weight_decay,
            num_replicas=experiment.strategy.num_replicas_in_sync,
            extra_variables=extra_variables,
        )

    if cfg.runtime.jit_compile:
        # Only the step: the input iterator and the loop around it cannot be compiled.
        step_fn = tf.function(step_fn, jit_compile=True, autograph=False)
    return step_fn


def non_finite_message(bad_step: int, values: dict[str, float], manager: tf.train.CheckpointManager) -> str:
    # A step's NaN/Inf loss makes the mean loss of the steps run with it non-finite too.
    what = "the loss" if not math.isfinite(values.get("train/total_loss", 0.0)) else "a gradient"
    return (
        f"Step {bad_step}: {what} became NaN or Inf, so its update was skipped and training "
        f"stopped without saving; the latest checkpoint in {manager.directory} is still the last "
        f"good one ({manager.latest_checkpoint or 'none yet'}). Lower --learning_rate (or raise "
        "--warmup_epochs), or check the input data read at that step."
    )


def is_event(step: int, total: int, log_every: int, checkpoint_every: int) -> bool:
    """Whether `step` gets a log line, a checkpoint, or ends training."""
    return step >= total or any(every > 0 and step % every == 0 for every in (log_every, checkpoint_every))


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
