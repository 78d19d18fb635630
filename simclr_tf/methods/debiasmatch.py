"""DebiasMatch / DebiasPL (Wang et al., CVPR 2022): FixMatch with debiased pseudo-labels.

A running mean q of the weak-view predictions measures the bias of the pseudo-labeler.
Adaptive debiasing: pseudo-labels come from `weak - tau * log q`, which lowers classes
predicted too often. Adaptive marginal loss: the strong-view logits are trained with
`+ tau * log q` added, a larger margin for the rarely predicted classes.

Follows frank-xwang/debiased-pseudo-labeling main_DebiasPL.py: causal_inference
(:196-199), initial_qhat (:201-205, uniform), update_qhat (:207-213), and the step
(:588-627): pseudo-labels use q BEFORE this batch's update (:588, :598), q is then
updated from the plain softmax of the weak logits (:602), and the margin uses the
UPDATED q (:605-610) with the same tau. (Transfer-Learning-Library's dev-ssl
debiasmatch.py:185-188 updates q first and uses it for both.) Defaults: the ImageNet-1%
recipe scripts/1perc-ssl/train_DebiasPL.sh (threshold 0.8, tau 0.4, qhat_m 0.999;
0.2%: qhat_m 0.99) and the argparse default lambda_u 10 (:123), which the scripts keep.
Their multi-view and CLD-loss options are left out.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi

Metrics = dict[str, tf.Tensor]


def initial_running_mean(num_classes: int) -> tf.Tensor:
    """(C,) float32 uniform 1/C, the running mean before any batch."""
    return tf.fill([num_classes], 1.0 / num_classes)


def debiasmatch_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_logits: tf.Tensor,
    strong_logits: tf.Tensor,
    running_mean: tf.Tensor,
    momentum: float = 0.999,
    debias_strength: float = 0.4,
    margin_strength: float = 0.4,
    threshold: float = 0.8,
    unlabeled_weight: float = 10.0,
    unlabeled_labels: tf.Tensor | None = None,
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> tuple[tf.Tensor, Metrics, tf.Tensor]:
    """FixMatch loss with adaptive debiasing and the adaptive marginal loss.

    Args:
      labeled_logits: (B, C) on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      weak_logits: (U, C) on the weakly augmented unlabeled images (the model itself, or
        its EMA copy as DebiasPL's --eman); constants here.
      strong_logits: (U, C) on their strong views; receive the gradient.
      running_mean: (C,) mean prediction q so far (`initial_running_mean` at step 0).
      momentum: q <- momentum * q + (1 - momentum) * mean_u softmax(weak).
      debias_strength: tau in the pseudo-labels `softmax(weak - tau * log q)`.
      margin_strength: tau in the marginal loss `CE(strong + tau * log q_new)`; the
        reference uses one tau for both.
      threshold: keep a pseudo-label when its debiased probability >= threshold.
      unlabeled_weight: lambda_u.
      unlabeled_labels: (U,) true labels, only for the "pseudo_label_acc" metric.
      replica_context: inside `strategy.run`, `tf.distribute.get_replica_context()`:
        the batch mean of the predictions is then averaged over replicas, so every
        replica computes the same new q (DebiasPL keeps one q per GPU instead).

    Returns:
      `(loss, metrics, new_running_mean)`; store the new (C,) mean for the next step.
      The unlabeled term is averaged over all U rows, masked ones included (:627).
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    weak_logits = tf.stop_gradient(tf.cast(weak_logits, tf.float32))
    running_mean = tf.stop_gradient(tf.cast(running_mean, tf.float32))
    log_prior = tf.math.log(running_mean)[None, :]  # (1, C)

    targets, mask, _ = common.pseudo_labels(
        weak_logits - debias_strength * log_prior, threshold=threshold
    )

    batch_mean = tf.reduce_mean(tf.nn.softmax(weak_logits, axis=-1), axis=0)  # (C,)
    if replica_context is not None and replica_context.num_replicas_in_sync > 1:
        batch_mean = replica_context.all_reduce(tf.distribute.ReduceOp.MEAN, batch_mean)
    new_running_mean = momentum * running_mean + (1.0 - momentum) * batch_mean

    margin_logits = tf.cast(strong_logits, tf.float32) + margin_strength * tf.math.log(
        new_running_mean
    )[None, :]
    unsup_loss = common.masked_cross_entropy(logits=margin_logits, targets=targets, mask=mask)

    metrics["unlabeled_loss"] = unsup_loss
    metrics.update(common.pseudo_label_metrics(targets, mask, unlabeled_labels))
    return sup_loss + unlabeled_weight * unsup_loss, metrics, new_running_mean


class DebiasMatch(semi.SemiSupervised):
    """`--train_mode=debiasmatch`: FixMatch with debiased pseudo-labels and an adaptive margin."""

    name = "debiasmatch"
    unlabeled_views = ("weak", "strong")
    # DebiasPL's ImageNet recipe (see `debiasmatch_loss`): threshold 0.8, lambda_u 10.
    defaults = {**semi.SemiSupervised.defaults, "pseudo_label_threshold": 0.8, "unlabeled_loss_weight": 10.0}

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        super().setup(model, optimizer)
        self.state = tf.Module(name="debiasmatch")
        # All replicas compute the same new value (the batch mean is all-reduced first).
        self.state.running_mean = tf.Variable(
            initial_running_mean(self.experiment.source.num_classes),
            trainable=False,
            name="running_mean",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def checkpoint_items(self) -> dict:
        return {**super().checkpoint_items(), "debiasmatch": self.state}

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)
        labeled_logits, weak_logits, strong_logits = self.logits_of(model, batch["image"], weak, strong)
        running_mean = self.state.running_mean
        strength = self.semi.debias_strength
        loss, metrics, new_mean = debiasmatch_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            weak_logits=weak_logits,
            strong_logits=strong_logits,
            running_mean=tf.convert_to_tensor(running_mean),
            momentum=self.semi.debias_momentum,
            debias_strength=strength,
            margin_strength=strength,
            threshold=self.pseudo_label_threshold,
            unlabeled_weight=self.unlabeled_loss_weight,
            unlabeled_labels=batch["unlabeled_label"],
            replica_context=base.replica_context_if_distributed(),
        )
        debiased = tf.cast(weak_logits, tf.float32) - strength * tf.math.log(tf.convert_to_tensor(running_mean))
        metrics = self.with_class_fractions(metrics, debiased)
        running_mean.assign(new_mean)
        return loss, metrics
