"""UDA (Xie et al., NeurIPS 2020): consistency between a sharpened weak view and a strong view.

Follows google-research/uda image/main.py (TSA :178-190 and :270-290, unlabeled term
:347-386) and text/uda.py:65-176, which agree. Defaults are the CIFAR-10 recipe
image/scripts/run_cifar10_gpu.sh: uda_softmax_temp 0.4, uda_confidence_thresh 0.8,
unsup_ratio 7, unsup_coeff 1, no TSA (text/scripts/run_base_uda.sh uses
linear_schedule). USB's port (semilearn/algorithms/uda/uda.py:77-101) differs: it masks
labeled rows by their max probability, averages over all rows and, calling the
pseudo-label hook with softmax=False, never applies the temperature; we follow UDA.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.config import TSA_SCHEDULES
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi

Metrics = dict[str, tf.Tensor]



def tsa_threshold(progress: tf.Tensor | float, *, schedule: str, num_classes: int) -> tf.Tensor:
    """Training-signal-annealing threshold, from 1/C at progress 0 towards 1.

    coeff is progress ("linear"), exp(5 (progress - 1)) ("exp", slow start) or
    1 - exp(-5 progress) ("log", fast start); threshold = coeff (1 - 1/C) + 1/C.
    "none" gives 1: no labeled example is ever masked.
    """
    progress = tf.cast(progress, tf.float32)
    if schedule == "none":
        return tf.ones_like(progress)
    if schedule == "linear":
        coeff = progress
    elif schedule == "exp":
        coeff = tf.exp((progress - 1.0) * 5.0)
    elif schedule == "log":
        coeff = 1.0 - tf.exp(-progress * 5.0)
    else:
        raise ValueError(f"tsa schedule must be one of {TSA_SCHEDULES}, got {schedule!r}")
    start = 1.0 / num_classes
    return coeff * (1.0 - start) + start


def kl_divergence_with_logits(*, p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """(N,) KL(softmax(p_logits) || softmax(q_logits)), summed over classes."""
    p_logits = tf.cast(p_logits, tf.float32)
    log_p = tf.nn.log_softmax(p_logits, axis=-1)
    log_q = tf.nn.log_softmax(tf.cast(q_logits, tf.float32), axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def uda_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_logits: tf.Tensor,
    strong_logits: tf.Tensor,
    progress: tf.Tensor | float,
    temperature: float = 0.4,
    confidence: float = 0.8,
    tsa: str = "none",
    unlabeled_weight: float = 1.0,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """TSA-masked labeled CE + unlabeled_weight * masked KL(sharpened weak || strong).

    Args:
      labeled_logits: (B, C); C sets the TSA start 1/C.
      labels: (B,) class ids or (B, C) one-hot.
      weak_logits: (U, C) on the original (weakly augmented) unlabeled images; the
        target, a constant.
      strong_logits: (U, C) on their RandAugment views; receive the gradient.
      progress: step / total_steps (float scalar), for TSA.
      temperature: target softmax temperature (1 = no sharpening).
      confidence: keep an unlabeled row when max softmax(weak), unsharpened, is
        strictly above it (0 keeps all, as UDA's -1).
      tsa: one of TSA_SCHEDULES.
      unlabeled_weight: UDA's unsup_coeff.
      unlabeled_labels: (U,) true labels, only for the "pseudo_label_acc" metric.

    Returns:
      `(loss, metrics)`. Labeled: a row whose true-class probability is above the TSA
      threshold is dropped; the sum over the rest is divided by max(kept rows, 1)
      (image/main.py:281-287). Unlabeled: per-row KL times the mask, averaged over all
      U rows (image/main.py:374-384).
    """
    if tsa not in TSA_SCHEDULES:
        raise ValueError(f"tsa schedule must be one of {TSA_SCHEDULES}, got {tsa!r}")
    if temperature <= 0:
        raise ValueError(f"uda_loss: temperature must be > 0, got {temperature}")
    labeled_logits = tf.cast(labeled_logits, tf.float32)
    num_classes = labeled_logits.shape[-1]
    if num_classes is None:
        raise ValueError("uda_loss: labeled_logits need a static class dimension (TSA starts at 1/C)")
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == labeled_logits.shape.rank:
        one_hot = tf.cast(labels, tf.float32)
    else:
        one_hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    per_example = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=labeled_logits)

    threshold = tsa_threshold(progress, schedule=tsa, num_classes=num_classes)
    probs = tf.nn.softmax(labeled_logits, axis=-1)
    correct_prob = tf.reduce_sum(one_hot * probs, axis=-1)
    if tsa == "none":
        sup_mask = tf.ones_like(correct_prob)
    else:
        sup_mask = tf.stop_gradient(1.0 - tf.cast(correct_prob > threshold, tf.float32))
    sup_loss = tf.reduce_sum(per_example * sup_mask) / tf.maximum(tf.reduce_sum(sup_mask), 1.0)

    pseudo, mask, _ = common.pseudo_labels(weak_logits, threshold=confidence, inclusive=False)
    # KL(sharpened weak || strong): the target softmax(weak / T) is a constant.
    per_row_kl = kl_divergence_with_logits(
        p_logits=tf.stop_gradient(tf.cast(weak_logits, tf.float32)) / temperature,
        q_logits=strong_logits,
    )
    unsup_loss = tf.reduce_mean(per_row_kl * mask)

    hits = tf.equal(
        tf.argmax(labeled_logits, axis=-1, output_type=tf.int32),
        tf.argmax(one_hot, axis=-1, output_type=tf.int32),
    )
    metrics = {
        "supervised_loss": sup_loss,
        "supervised_acc": tf.reduce_mean(tf.cast(hits, tf.float32)),
        "unlabeled_loss": unsup_loss,
        "tsa_threshold": threshold,
        # Fraction of labeled rows still trained (UDA's sup/sup_trained_ratio).
        "tsa_trained_ratio": tf.reduce_mean(sup_mask),
    }
    metrics.update(common.pseudo_label_metrics(pseudo, mask, unlabeled_labels))
    return sup_loss + unlabeled_weight * unsup_loss, metrics


class Uda(semi.SemiSupervised):
    """`--train_mode=uda`: the strong view matches the sharpened, confident weak-view prediction."""

    name = "uda"
    unlabeled_views = ("weak", "strong")
    unused_flags = ("pseudo_label_threshold",)  # --uda_confidence masks instead

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS + ("tsa_threshold", "tsa_trained_ratio")

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)
        labeled_logits, weak_logits, strong_logits = self.logits_of(model, batch["image"], weak, strong)
        loss, metrics = uda_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            weak_logits=weak_logits,
            strong_logits=strong_logits,
            progress=self.progress(),
            temperature=self.semi.uda_temperature,
            confidence=self.semi.uda_confidence,
            tsa=self.semi.tsa,
            unlabeled_weight=self.unlabeled_loss_weight,
            unlabeled_labels=batch["unlabeled_label"],
        )
        # UDA's confidence mask is strict (image/main.py), as `uda_loss`'s.
        return loss, self.with_class_fractions(metrics, weak_logits, threshold=self.semi.uda_confidence, inclusive=False)
