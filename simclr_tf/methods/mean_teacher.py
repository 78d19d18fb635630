"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): match an EMA teacher's softmax.

The consistency cost is the squared difference of the two softmaxes averaged over
classes and examples: CuriousAI/mean-teacher pytorch/mean_teacher/losses.py
`softmax_mse_loss` (sum / num_classes, then / batch size in main.py), the TF1 port in
google-research/fixmatch mean_teacher.py:61-62 and USB core/criterions/consistency.py:29
all normalise so. Its weight ramps up with `sigmoid_rampup` (ramps.py), as the paper;
USB and the fixmatch port ramp linearly instead (meanteacher.py:68, mean_teacher.py:45).
Defaults are their CIFAR recipe (fixmatch mean_teacher.py:111-114, USB
config/classic_cv/meanteacher/*.yaml): weight 50, ramp over 0.4 of training, EMA
0.999; the paper's CIFAR-10 run used weight 100 and a 5-of-180-epoch ramp
(pytorch/experiments/cifar10_test.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi

Metrics = dict[str, tf.Tensor]


def softmax_mse(*, student_logits: tf.Tensor, teacher_logits: tf.Tensor) -> tf.Tensor:
    """(N,) mean over classes of (softmax(student) - softmax(teacher))^2; teacher constant."""
    student = tf.nn.softmax(tf.cast(student_logits, tf.float32), axis=-1)
    teacher = tf.nn.softmax(tf.stop_gradient(tf.cast(teacher_logits, tf.float32)), axis=-1)
    return tf.reduce_mean(tf.square(student - teacher), axis=-1)


def mean_teacher_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    student_logits: tf.Tensor,
    teacher_logits: tf.Tensor,
    progress: tf.Tensor | float,
    weight: float = 50.0,
    rampup_fraction: float = 0.4,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """`CE(labeled) + weight * sigmoid_rampup(progress) * mean softmax MSE`.

    Args:
      labeled_logits: (B, C), the student on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      student_logits: (U, C), the student on one augmented view of the images the
        consistency covers (the unlabeled ones, or labeled and unlabeled together as
        the paper's main.py does).
      teacher_logits: (U, C), the EMA teacher on another view of the same images; a
        target, so no gradient flows into it.
      progress: step / total_steps (float scalar).
      weight: maximal consistency weight.
      rampup_fraction: the weight ramps up over this fraction of training (0: none).
      unlabeled_labels: (U,) true labels, only for the "teacher_acc" metric.

    Returns:
      `(loss, metrics)`; "unlabeled_loss" is the consistency before its weight,
      "consistency_weight" the ramped weight.
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    consistency = tf.reduce_mean(
        softmax_mse(student_logits=student_logits, teacher_logits=teacher_logits)
    )
    ramped_weight = weight * common.sigmoid_rampup(progress, rampup_fraction=rampup_fraction)
    metrics["unlabeled_loss"] = consistency
    metrics["consistency_weight"] = ramped_weight
    if unlabeled_labels is not None:
        teacher_pred = tf.argmax(tf.cast(teacher_logits, tf.float32), axis=-1, output_type=tf.int32)
        hits = tf.equal(teacher_pred, tf.cast(unlabeled_labels, tf.int32))
        metrics["teacher_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
    return sup_loss + ramped_weight * consistency, metrics


class MeanTeacher(semi.SemiSupervised):
    """`--train_mode=mean_teacher`: the weight average is the teacher of a consistency loss."""

    name = "mean_teacher"
    # Two independent weak views: the student sees one, the teacher the other.
    unlabeled_views = ("weak", "weak")
    # USB meanteacher's ulb_loss_ratio, as `mean_teacher_loss`.
    defaults = {**semi.SemiSupervised.defaults, "unlabeled_loss_weight": 50.0}
    unused_flags = ("pseudo_label_threshold",)

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + ("unlabeled_loss", "consistency_weight", "teacher_acc")

    def vector_metric_sizes(self) -> dict[str, int]:
        return {}  # no pseudo-labels

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        student_view, teacher_view = self.split_unlabeled(batch)
        labeled_logits, student_logits = self.logits_of(model, batch["image"], student_view)
        # training=True reaches only dropout and stochastic depth: the average is not
        # trainable, and Keras runs a non-trainable batch norm in inference mode, so the
        # teacher normalises with its averaged moving statistics. USB's teacher uses batch
        # statistics (the EMA weights swapped into the model in train mode).
        teacher_logits = self.average.model(teacher_view, training=True)["logits_sup"]
        return mean_teacher_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            progress=self.progress(),
            weight=self.unlabeled_loss_weight,
            rampup_fraction=self.semi.consistency_rampup_fraction,
            unlabeled_labels=batch["unlabeled_label"],
        )
