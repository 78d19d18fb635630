"""Per-replica step functions.

A loss function (a train mode's `Method`) maps `(model, batch)` to `(loss, metrics)`;
`train_step` adds weight decay, scales for the replica count, and applies gradients.
Everything a step needs is an argument: nothing here reads flags or hard-codes a
hyper-parameter.
"""

from __future__ import annotations

from typing import Callable, Mapping

import keras
import tensorflow as tf

from simclr_tf import losses

Batch = Mapping[str, tf.Tensor]
Metrics = dict[str, tf.Tensor]
LossFn = Callable[[keras.Model, Batch], tuple[tf.Tensor, Metrics]]

# Added by `train_step` for every mode.
STEP_METRICS = ("total_loss", "weight_decay")
# Also in `train_step`'s result: bool, whether the update was applied (see `apply_if_finite`).
FINITE = "finite"


def train_step(
    batch: Batch,
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: LossFn,
    decayed_variables: list,
    weight_decay: float,
    num_replicas: int,
    extra_variables: list = (),
) -> Metrics:
    """One optimizer step on this replica's batch; returns scalar metrics and `FINITE`."""
    with tf.GradientTape() as tape:
        loss, metrics = loss_fn(model, batch)
        decay = losses.weight_decay_loss(decayed_variables, weight_decay)
        total_loss = loss + decay
        # Keras sums gradients over replicas; dividing here applies their mean.
        # scale_loss: a LossScaleOptimizer's dynamic scale (mixed_float16), else identity.
        scaled_loss = optimizer.scale_loss(total_loss / num_replicas)
    # Extra trained variables: a method's own heads, outside the model.
    variables = model.trainable_variables + list(extra_variables)
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


# Model outputs `logits_sup_<name>`: extra classifier heads, each scored by evaluation.
EXTRA_LOGITS_PREFIX = "logits_sup_"


def eval_step(batch: Batch, *, model: keras.Model) -> dict[str, tf.Tensor]:
    """Inference outputs needed by the evaluators."""
    outputs = model(batch["image"], training=False)
    # Evaluators work in float32 whatever the model's compute dtype (--precision).
    result = {"label": batch["label"], "features": tf.cast(outputs["final_avg_pool"], tf.float32)}
    if "logits_sup" in outputs:
        result["logits"] = tf.cast(outputs["logits_sup"], tf.float32)
    # A model with several classifier heads (e.g. two branches) names each extra one
    # `logits_sup_<name>`: scored too, as result["logits_<name>"].
    for key, value in outputs.items():
        if key.startswith(EXTRA_LOGITS_PREFIX):
            result["logits_" + key[len(EXTRA_LOGITS_PREFIX):]] = tf.cast(value, tf.float32)
    return result

