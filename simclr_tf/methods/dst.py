"""Debiased Self-Training (Chen et al., NeurIPS 2022): decoupled and worst-case-aware heads.

Three heads share the backbone features f:
  - main head h: trained on labeled data only; its weak-view predictions are the
    pseudo-labels (and the model used at test time);
  - pseudo head h_pseudo: trained on those pseudo-labels with the strong view, so the
    main head never learns from its own mistakes; only the features get that signal;
  - worst-case head h_worst, fed through a gradient reversal layer R(f): it learns to
    agree with h on labeled data and to contradict it on unlabeled data, while the
    reversed gradient moves f against that worst case.

Follows the from-scratch code, Transfer-Learning-Library branch dev-ssl,
projects/dst/dst.py: the heads (:41-86), the step (:313-331), defaults (:480-492:
threshold 0.95, trade-off-self-training 1, trade-off-worst 0.3, eta-prime 2,
grl-factor 0.1, warmup-iterations 100k of train-iterations 1M; its README runs CIFAR-10
with threshold 0.9); WorstCaseEstimationLoss in tllib/self_training/dst.py:95-145 and
the warm-start reversal in tllib/modules/grl.py. The fine-tuning variant on master
(examples/semi_supervised_learning/image_classification/dst.py:176-178) also trains h
with 0.1 * CE on strongly augmented labeled images; left out here.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi
from simclr_tf.models import heads

Metrics = dict[str, tf.Tensor]

# Added inside log(1 - p) so a worst head certain of the main head's class gives a
# large finite loss, not inf (tllib/self_training/dst.py:95-100 `shift_log`).
_LOG_OFFSET = 1e-6


def gradient_reversal(x: tf.Tensor, scale: tf.Tensor | float) -> tf.Tensor:
    """Identity forward; backward multiplies the gradient by -scale.

    Put between the shared features and the worst-case head: `h_worst(R(f))`.
    """
    @tf.custom_gradient
    def _reverse(inputs):
        def grad(upstream):
            return -tf.cast(scale, upstream.dtype) * upstream

        return tf.identity(inputs), grad

    return _reverse(x)


def grl_coefficient(
    progress: tf.Tensor | float,
    *,
    max_coefficient: float = 0.1,
    warmup_fraction: float = 0.1,
    alpha: float = 1.0,
) -> tf.Tensor:
    """Warm-start reversal scale 2 hi / (1 + exp(-alpha i / N)) - hi, from 0 towards hi.

    tllib WarmStartGradientReverseLayer with lo = 0, hi = max_coefficient and
    i / N = progress / warmup_fraction (N = warmup-iterations). It reaches ~0.46 hi at
    i = N and approaches hi only later, as the reference.
    """
    if warmup_fraction <= 0:
        raise ValueError(f"grl_coefficient: warmup_fraction must be > 0, got {warmup_fraction}")
    ratio = tf.cast(progress, tf.float32) / warmup_fraction
    return 2.0 * max_coefficient / (1.0 + tf.exp(-alpha * ratio)) - max_coefficient


def worst_case_estimation_loss(
    *,
    labeled_logits: tf.Tensor,
    worst_labeled_logits: tf.Tensor,
    weak_logits: tf.Tensor,
    worst_unlabeled_logits: tf.Tensor,
    eta_prime: float = 2.0,
) -> tf.Tensor:
    """eta' * CE(h_worst on labeled, argmax h) + mean_u -log(1 - p_worst[argmax h] + 1e-6).

    The targets are the main head's predicted classes (on labeled data too, not the
    true labels; tllib/self_training/dst.py:139-143); argmax passes no gradient, so
    this term reaches the main head's parameters only through the shared features.
    """
    pred_l = tf.argmax(tf.cast(labeled_logits, tf.float32), axis=-1, output_type=tf.int32)
    pred_u = tf.argmax(tf.cast(weak_logits, tf.float32), axis=-1, output_type=tf.int32)
    worst_labeled_logits = tf.cast(worst_labeled_logits, tf.float32)
    loss_l = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=pred_l, logits=worst_labeled_logits)
    )
    worst_probs = tf.nn.softmax(tf.cast(worst_unlabeled_logits, tf.float32), axis=-1)
    prob_of_pred = tf.gather(worst_probs, pred_u, axis=1, batch_dims=1)  # (U,)
    log_disagree = tf.math.log(tf.minimum(1.0 - prob_of_pred + _LOG_OFFSET, 1.0))
    return eta_prime * loss_l - tf.reduce_mean(log_disagree)


def dst_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_logits: tf.Tensor,
    pseudo_strong_logits: tf.Tensor,
    worst_labeled_logits: tf.Tensor,
    worst_unlabeled_logits: tf.Tensor,
    threshold: float = 0.95,
    self_training_weight: float = 1.0,
    worst_case_weight: float = 0.3,
    eta_prime: float = 2.0,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """CE(h, labeled) + w_st * self-training(h_pseudo) + w_worst * worst-case(h_worst).

    Args:
      labeled_logits: (B, C) main head h on the (weakly augmented) labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      weak_logits: (U, C) main head h on the weak unlabeled views: the pseudo-labels
        and the worst head's targets; constants here.
      pseudo_strong_logits: (U, C) pseudo head h_pseudo on the strong unlabeled views.
      worst_labeled_logits: (B, C) worst head on R(f) of the labeled images.
      worst_unlabeled_logits: (U, C) worst head on R(f) of the weak unlabeled views.
        R is `gradient_reversal(f, grl_coefficient(progress))`, applied in the model.
      threshold: keep a pseudo-label when max softmax(weak) > threshold (strictly,
        projects/dst/utils.py:381).
      self_training_weight: trade-off-self-training.
      worst_case_weight: trade-off-worst.
      eta_prime: weight of the labeled part inside the worst-case loss.
      unlabeled_labels: (U,) true labels, only for the "pseudo_label_acc" metric.

    Returns:
      `(loss, metrics)`; "unlabeled_loss" (self-training, averaged over all U rows as
      FixMatch) and "worst_case_loss" are logged before their weights.
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    targets, mask, _ = common.pseudo_labels(weak_logits, threshold=threshold, inclusive=False)
    self_training = common.masked_cross_entropy(
        logits=pseudo_strong_logits, targets=targets, mask=mask
    )
    worst_case = worst_case_estimation_loss(
        labeled_logits=labeled_logits,
        worst_labeled_logits=worst_labeled_logits,
        weak_logits=weak_logits,
        worst_unlabeled_logits=worst_unlabeled_logits,
        eta_prime=eta_prime,
    )
    metrics["unlabeled_loss"] = self_training
    metrics["worst_case_loss"] = worst_case
    metrics.update(common.pseudo_label_metrics(targets, mask, unlabeled_labels))
    loss = sup_loss + self_training_weight * self_training + worst_case_weight * worst_case
    return loss, metrics


class Dst(semi.SemiSupervised):
    """`--train_mode=dst`: a pseudo head learns the pseudo-labels; a worst-case head guards the features."""

    name = "dst"
    unlabeled_views = ("weak", "strong")

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        super().setup(model, optimizer)
        num_classes = self.experiment.source.num_classes
        features = semi.classifier_input_dim(model)
        self.heads = tf.Module(name="dst_heads")
        self.heads.pseudo = heads.SupervisedHead(num_classes, name="head_supervised_pseudo")
        self.heads.worst = heads.SupervisedHead(num_classes, name="head_supervised_worst_case")
        for head in (self.heads.pseudo, self.heads.worst):
            head.build((None, features))

    def extra_trainable_variables(self) -> list:
        return self.heads.pseudo.trainable_variables + self.heads.worst.trainable_variables

    def checkpoint_items(self) -> dict:
        return {**super().checkpoint_items(), "dst_heads": self.heads}

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS + ("worst_case_loss",)

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)
        images = [batch["image"], weak, strong]
        outputs = model(tf.concat(images, axis=0), training=True)
        sizes = [tf.shape(i)[0] for i in images]
        labeled_logits, weak_logits, _ = tf.split(outputs["logits_sup"], sizes, axis=0)
        labeled_features, weak_features, strong_features = tf.split(outputs["supervised_head_input"], sizes, axis=0)
        reversed_features = gradient_reversal(
            tf.concat([labeled_features, weak_features], axis=0),
            grl_coefficient(self.progress(), max_coefficient=self.semi.dst_grl_factor),
        )
        worst_labeled, worst_unlabeled = tf.split(
            self.heads.worst(reversed_features, training=True), sizes[:2], axis=0
        )
        loss, metrics = dst_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            weak_logits=weak_logits,
            pseudo_strong_logits=self.heads.pseudo(strong_features, training=True),
            worst_labeled_logits=worst_labeled,
            worst_unlabeled_logits=worst_unlabeled,
            threshold=self.pseudo_label_threshold,
            self_training_weight=self.unlabeled_loss_weight,
            worst_case_weight=self.semi.dst_worst_case_weight,
            eta_prime=self.semi.dst_eta_prime,
            unlabeled_labels=batch["unlabeled_label"],
        )
        # DST's pseudo-label mask is strict (tllib pseudo_label.py), as `dst_loss`'s.
        return loss, self.with_class_fractions(metrics, weak_logits, inclusive=False)
