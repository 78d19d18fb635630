"""Per-replica step functions, one loss function per train mode.

A loss function maps `(model, batch)` to `(loss, metrics)`; `train_step` adds weight
decay, scales for the replica count, and applies gradients. Everything a step needs is
an argument: nothing here reads flags or hard-codes a hyper-parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import keras
import tensorflow as tf

from simclr_tf import losses

Batch = Mapping[str, tf.Tensor]
Metrics = dict[str, tf.Tensor]
LossFn = Callable[[keras.Model, Batch], tuple[tf.Tensor, Metrics]]

CONTRASTIVE_METRICS = ("contrast_loss", "contrast_acc", "contrast_entropy")
SUPERVISED_METRICS = ("supervised_loss", "supervised_acc")
DISTILL_METRICS = ("distill_loss", "distill_agreement")
# Added by `train_step` for every mode.
STEP_METRICS = ("total_loss", "weight_decay")
# Also in `train_step`'s result: bool, whether the update was applied (see `apply_if_finite`).
FINITE = "finite"


@dataclasses.dataclass(frozen=True)
class PretrainLoss:
    """NT-Xent on the projections, plus linear eval on the (stop-gradient) features."""

    temperature: float
    hidden_norm: bool

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        has_head = getattr(model, "supervised_head", None) is not None
        return CONTRASTIVE_METRICS + (SUPERVISED_METRICS if has_head else ()) + STEP_METRICS

    def __call__(self, model: keras.Model, batch: Batch) -> tuple[tf.Tensor, Metrics]:
        outputs = model(batch["image"], training=True)  # image: (2B, H, W, 3), view-major
        loss, metrics = losses.nt_xent_loss(
            projections=outputs["proj_head_output"],
            temperature=self.temperature,
            hidden_norm=self.hidden_norm,
            replica_context=_replica_context_if_distributed(),
        )
        if "logits_sup" in outputs:
            # Both views carry the example's label.
            labels = tf.concat([batch["label"], batch["label"]], axis=0)
            sup_loss, sup_metrics = losses.supervised_loss(labels=labels, logits=outputs["logits_sup"])
            loss += sup_loss
            metrics.update(sup_metrics)
        return loss, metrics


@dataclasses.dataclass(frozen=True)
class FinetuneLoss:
    """Cross-entropy on the labeled batch (finetune, and supervised from scratch)."""

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return SUPERVISED_METRICS + STEP_METRICS

    def __call__(self, model: keras.Model, batch: Batch) -> tuple[tf.Tensor, Metrics]:
        outputs = model(batch["image"], training=True)
        return losses.supervised_loss(labels=batch["label"], logits=outputs["logits_sup"])


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """SimCLRv2 distillation: the student matches the frozen teacher's softmax at `temperature`.

    With `label_weight` w > 0 the batch also holds a labeled part and the loss is
    (1 - w) * distillation + w * cross-entropy on the labeled examples.
    """

    teacher: keras.Model
    temperature: float
    label_weight: float = 0.0

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        labeled = SUPERVISED_METRICS if self.label_weight > 0 else ()
        return DISTILL_METRICS + labeled + STEP_METRICS

    def __call__(self, model: keras.Model, batch: Batch) -> tuple[tf.Tensor, Metrics]:
        unlabeled = batch["image"]  # (B, H, W, 3); its labels are never used
        teacher_logits = self.teacher(unlabeled, training=False)["logits_sup"]
        if self.label_weight <= 0:
            student_logits = model(unlabeled, training=True)["logits_sup"]
            return losses.distillation_loss(
                teacher_logits=teacher_logits, student_logits=student_logits, temperature=self.temperature
            )
        # One student pass over both parts, so batch norm sees them together.
        logits = model(tf.concat([unlabeled, batch["labeled_image"]], axis=0), training=True)["logits_sup"]
        student_logits, labeled_logits = tf.split(logits, [tf.shape(unlabeled)[0], -1], axis=0)
        distill, metrics = losses.distillation_loss(
            teacher_logits=teacher_logits, student_logits=student_logits, temperature=self.temperature
        )
        labeled, labeled_metrics = losses.supervised_loss(labels=batch["labeled_label"], logits=labeled_logits)
        metrics.update(labeled_metrics)
        return (1.0 - self.label_weight) * distill + self.label_weight * labeled, metrics


def train_step(
    batch: Batch,
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: LossFn,
    decayed_variables: list,
    weight_decay: float,
    num_replicas: int,
) -> Metrics:
    """One optimizer step on this replica's batch; returns scalar metrics and `FINITE`."""
    with tf.GradientTape() as tape:
        loss, metrics = loss_fn(model, batch)
        decay = losses.weight_decay_loss(decayed_variables, weight_decay)
        total_loss = loss + decay
        # Keras sums gradients over replicas; dividing here applies their mean.
        # scale_loss: a LossScaleOptimizer's dynamic scale (mixed_float16), else identity.
        scaled_loss = optimizer.scale_loss(total_loss / num_replicas)
    variables = model.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    finite = apply_if_finite(optimizer, grads, variables, total_loss)
    metrics = dict(metrics)
    metrics["weight_decay"] = tf.convert_to_tensor(decay, tf.float32)
    metrics["total_loss"] = total_loss
    metrics[FINITE] = finite
    return metrics


def apply_if_finite(
    optimizer: keras.optimizers.Optimizer, grads: list, variables: list, loss: tf.Tensor
) -> tf.Tensor:
    """Applies the gradients only if the loss and every gradient are finite on all replicas.

    Returns that decision (a bool, the same on every replica). A skipped step leaves
    the weights, the optimizer's slots and its step count as they were. A
    LossScaleOptimizer skips non-finite gradients itself (and lowers its scale), so
    only its loss is checked here.
    """
    checked = [loss] if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else [loss, *grads]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in checked if t is not None])
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync > 1:
        # Count the replicas that saw a non-finite value (ReduceOp has no MIN).
        failures = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        finite = tf.equal(failures, 0.0)

    def apply(grads: list) -> None:
        optimizer.apply_gradients(zip(grads, variables))

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, lambda: apply(grads), lambda: None)
        return finite

    # Strategies that all-reduce through merge_call (MirroredStrategy) refuse a
    # replica-context cond around it, so branch in cross-replica context, as Keras's
    # LossScaleOptimizer does; each replica then applies its own gradients.
    def branch(strategy: tf.distribute.Strategy, finite, grads) -> None:
        decision = strategy.experimental_local_results(finite)[0]
        tf.cond(decision, lambda: strategy.extended.call_for_each_replica(apply, args=(grads,)), lambda: None)

    context.merge_call(branch, args=(finite, grads))
    return finite


def eval_step(batch: Batch, *, model: keras.Model) -> dict[str, tf.Tensor]:
    """Inference outputs needed by the evaluators."""
    outputs = model(batch["image"], training=False)
    # Evaluators work in float32 whatever the model's compute dtype (--precision).
    result = {"label": batch["label"], "features": tf.cast(outputs["final_avg_pool"], tf.float32)}
    if "logits_sup" in outputs:
        result["logits"] = tf.cast(outputs["logits_sup"], tf.float32)
    return result


def _replica_context_if_distributed():
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context
