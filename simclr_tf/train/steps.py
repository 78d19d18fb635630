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
    """One optimizer step on this replica's batch; returns scalar metrics."""
    with tf.GradientTape() as tape:
        loss, metrics = loss_fn(model, batch)
        decay = losses.weight_decay_loss(decayed_variables, weight_decay)
        total_loss = loss + decay
        # Keras sums gradients over replicas; dividing here applies their mean.
        scaled_loss = total_loss / num_replicas
    variables = model.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    metrics = dict(metrics)
    metrics["weight_decay"] = tf.convert_to_tensor(decay, tf.float32)
    metrics["total_loss"] = total_loss
    return metrics


def eval_step(batch: Batch, *, model: keras.Model) -> dict[str, tf.Tensor]:
    """Inference outputs needed by the evaluators."""
    outputs = model(batch["image"], training=False)
    result = {"label": batch["label"], "features": outputs["final_avg_pool"]}
    if "logits_sup" in outputs:
        result["logits"] = outputs["logits_sup"]
    return result


def _replica_context_if_distributed():
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context
