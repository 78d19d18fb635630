"""`Method`: what a train mode adds to the shared loop, and nothing the loop knows by name.

A train mode (`--train_mode`) is one `Method` subclass in its own module: its model, the
batches its step reads, its loss, and any state beyond the model's weights (a teacher,
an average of the weights, extra heads, running statistics). The trainer, checkpoints
and evaluation only call the hooks below, so a new method is a new module plus a line
in `registry.METHODS`, never an edit of the loop.

Lifecycle in a run: `Method(experiment)` -> `build_model()` and `setup(model, optimizer)`
under the strategy scope -> the checkpoint holds `model`, `optimizer` and
`checkpoint_items()` -> restore -> `after_restore(report)` -> every step runs
`__call__(model, batch)` on each replica, then `after_update(model)` once in
cross-replica context -> evaluation and export use `eval_model(model)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import keras
import tensorflow as tf

from simclr_tf import data as data_lib

if TYPE_CHECKING:
    from simclr_tf.train.checkpoints import RestoreReport
    from simclr_tf.train.experiment import Experiment

Batch = Mapping[str, tf.Tensor]
Metrics = dict[str, tf.Tensor]

SUPERVISED_METRICS = ("supervised_loss", "supervised_acc")


class Method:
    """Base class: a supervised classifier on the labeled subset, one crop/flip view."""

    name: ClassVar[str]
    # An epoch is a pass over the labeled subset (else over the whole train split).
    epochs_over_labeled_subset: ClassVar[bool] = False

    def __init__(self, experiment: "Experiment"):
        self.experiment = experiment
        self.config = experiment.config

    # -- what run.py runs -------------------------------------------------------------
    @classmethod
    def run(cls, config, model_dir: str, strategy: tf.distribute.Strategy | None = None) -> dict | None:
        """The whole of `--train_mode`: one `train_and_evaluate` in `model_dir`, by default.

        A method made of several runs overrides it (Noisy Student: a run per round, each in
        a sub-directory); the runs themselves still go through `train_and_evaluate`.
        """
        from simclr_tf.train.runner import train_and_evaluate  # the runner imports the registry

        return train_and_evaluate(config, model_dir, strategy)

    # -- checks and sizes -------------------------------------------------------------
    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        """Raises config.FlagError for flag combinations this method cannot train with."""

    @classmethod
    def examples_per_step(cls, config) -> int:
        """Examples of the stream an epoch counts that one global step reads."""
        return config.train.train_batch_size

    @classmethod
    def images_per_step(cls, config) -> int:
        """Images (not views) one global step reads, for the images/s the log reports."""
        return config.train.train_batch_size

    # -- model and state --------------------------------------------------------------
    def build_model(self) -> keras.Model:
        """The trained model, built; called under the strategy scope."""
        return self.experiment.build_classifier()

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        """Creates the method's own state (under the strategy scope), before any restore."""

    def extra_trainable_variables(self) -> list:
        """Trained variables outside the model (extra heads), optimised with it."""
        return []

    def checkpoint_items(self) -> dict[str, Any]:
        """Trackables saved next to `model` and `optimizer`, by checkpoint key."""
        return {}

    def after_restore(self, model: keras.Model, report: "RestoreReport") -> None:
        """Called once the model (and, when resuming, `checkpoint_items`) is restored."""

    def after_update(self, model: keras.Model) -> None:
        """Runs in cross-replica context after each applied update (e.g. an EMA)."""
        return None  # a body AutoGraph can convert (a docstring alone is none)

    def eval_model(self, model: keras.Model) -> keras.Model:
        """The model evaluation and export use (e.g. the weight average)."""
        return model

    def eval_labels(self, labels: tf.Tensor) -> tf.Tensor:
        """The labels the classifier's accuracy is measured against (e.g. PU's binary ones)."""
        return labels

    def eval_checkpoint_root(self) -> str:
        """Checkpoint key whose weights `--mode=eval` restores into the evaluated model."""
        return "model"

    # -- the step ---------------------------------------------------------------------
    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return SUPERVISED_METRICS

    def vector_metric_sizes(self) -> dict[str, int]:
        """Per-step metrics that are vectors (e.g. a class distribution), by length."""
        return {}

    def __call__(self, model: keras.Model, batch: Batch) -> tuple[tf.Tensor, Metrics]:
        raise NotImplementedError

    # -- data -------------------------------------------------------------------------
    def train_batches(
        self,
        batch_size: int,
        context: tf.distribute.InputContext | None,
        *,
        start_step: int,
        cache: bool,
    ) -> tf.data.Dataset:
        """This replica's training batches, continuing at global step `start_step`."""
        raise NotImplementedError

    def labeled_subset(self) -> data_lib.LabeledSubset:
        from simclr_tf.train.experiment import labeled_subset  # it imports the registry

        return labeled_subset(self.config)

    def preview_images(self, batch: Batch, count: int) -> tf.Tensor:
        """`count` examples' training views, each example's side by side: (count*V, S, S, 3)."""
        images = batch["image"]  # (V*count, S, S, 3), view-major
        views = images.shape[0] // count
        images = tf.reshape(images, [views, count, *images.shape[1:]])
        return tf.reshape(tf.transpose(images, [1, 0, 2, 3, 4]), [-1, *images.shape[2:]])


def require_checkpoint(config, *, resuming: bool, what: str) -> None:
    """Raises FlagError unless --checkpoint is given (or the run resumes, or only evaluates).

    `what`: the message after "--checkpoint: ", saying what the mode needs and why.
    """
    from simclr_tf.config import FlagError

    if config.train.mode != "eval" and not config.train.checkpoint and not resuming:
        raise FlagError(f"--checkpoint: {what}")


def start_example(start_step: int, examples_per_step: int, context: tf.distribute.InputContext | None) -> int:
    """Examples one input pipeline has read after `start_step` global steps."""
    pipelines = context.num_input_pipelines if context is not None else 1
    return start_step * examples_per_step // pipelines


def replica_context_if_distributed() -> tf.distribute.ReplicaContext | None:
    """The replica context when several replicas train, for losses that gather across them."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context
