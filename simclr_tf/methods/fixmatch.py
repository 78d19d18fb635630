"""FixMatch (Sohn et al., NeurIPS 2020): confident weak-view pseudo-labels train the strong view.

Reference: google-research/fixmatch fixmatch.py:107-131 (defaults: confidence 0.95,
wu 1, uratio 7, fixmatch.py:165-171); USB semilearn/algorithms/fixmatch/fixmatch.py.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi

Metrics = dict[str, tf.Tensor]


def fixmatch_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_logits: tf.Tensor,
    strong_logits: tf.Tensor,
    threshold: float = 0.95,
    unlabeled_weight: float = 1.0,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """`CE(labeled) + unlabeled_weight * mean_u[mask * CE(argmax p_weak, strong)]`.

    Args:
      labeled_logits: (B, C) on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      weak_logits: (U, C) on the weakly augmented unlabeled images; only the source of
        the pseudo-labels, so no gradient flows into them.
      strong_logits: (U, C) on the strongly augmented views of the same images.
      threshold: keep a pseudo-label when max softmax(weak) >= threshold.
      unlabeled_weight: lambda_u.
      unlabeled_labels: (U,) true labels, only for the "pseudo_label_acc" metric.

    Returns:
      `(loss, metrics)`; the unlabeled term is averaged over all U rows, masked ones
      included (fixmatch.py:118). "unlabeled_loss" is logged before the weight.
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    targets, mask, _ = common.pseudo_labels(weak_logits, threshold=threshold)
    unsup_loss = common.masked_cross_entropy(logits=strong_logits, targets=targets, mask=mask)
    metrics["unlabeled_loss"] = unsup_loss
    metrics.update(common.pseudo_label_metrics(targets, mask, unlabeled_labels))
    return sup_loss + unlabeled_weight * unsup_loss, metrics


class FixMatch(semi.SemiSupervised):
    """`--train_mode=fixmatch`: confident weak-view pseudo-labels train the strong view."""

    name = "fixmatch"
    unlabeled_views = ("weak", "strong")

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)
        labeled_logits, weak_logits, strong_logits = self.logits_of(model, batch["image"], weak, strong)
        loss, metrics = fixmatch_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            weak_logits=weak_logits,
            strong_logits=strong_logits,
            threshold=self.pseudo_label_threshold,
            unlabeled_weight=self.unlabeled_loss_weight,
            unlabeled_labels=batch["unlabeled_label"],
        )
        return loss, self.with_class_fractions(metrics, weak_logits)
