"""Meta Pseudo Labels (Pham et al., CVPR 2021) and Self Meta Pseudo Labels (Ng & Wang, 2022).

A teacher labels the strong view of each unlabeled image with a hard pseudo-label y^
(its argmax, or a sample from its softmax as the paper); the student learns y^ with
cross-entropy. The teacher learns from the student's progress: the reward
h = CE_l(theta) - CE_l(theta'), the student's cross-entropy on the labeled batch before
and after a (virtual) SGD step on the pseudo-labels, scales the teacher's own
cross-entropy on y^, next to its supervised loss and a UDA consistency term.

One step of the shared loop trains both, by one gradient of one loss:
  - g_u = grad_theta CE(y^, S(x_u strong)) (an inner tape; averaged over replicas);
  - theta' = theta - lr_s g_u, evaluated without assigning it (`model.stateless_call`,
    batch statistics of the labeled batch, the moving statistics left alone);
  - h = CE_l(theta) - CE_l(theta'), a constant;
  - loss = [student] CE(y^, S(x_u strong)) + [teacher] CE(y, T(x_l)) +
    w_uda * UDA(T(x_u weak) -> T(x_u strong)) + h * CE(y^, T(x_u strong)).
The student's term reaches the loss as `gradient_as_loss(g_u)`, so the loop's tape does
not backpropagate through the student a second time.

h's sign. First order, CE_l(theta') = CE_l(theta) - lr_s grad CE_l . g_u, so the paper's
h = lr_s grad CE_l(theta') . g_u (Appendix A) is the labeled loss the step removed:
CE_l(theta) - CE_l(theta'). A positive h (the step helped) makes the teacher more
likely to give y^ again. google-research meta_pseudo_labels/training_utils.py (class
MPL) computes `dot_product = cross_entropy['s_on_l_new'] - shadow`, the opposite sign,
minus a moving average of it; there the term's gradient vanishes anyway (its target is
the teacher's own softmax, google-research issue #534), and kekmodel/MPL-pytorch main.py
keeps that sign next to a comment that the paper's derivation gives ours (its issue #6).
We follow the derivation; no moving-average baseline.

Self-MPL (`--mpl_self`): one network is student and teacher. Its own strong-view argmax
(or sample) is y^, so its loss is (1 + h) CE(y^, S(x_u strong)) + CE_l + w_uda * UDA:
the reward scales its own pseudo-label term. One model and one set of optimizer slots
are held, half of two-model MPL's (activations, most of the peak memory at small widths,
stay about the same), at the price of one more backward pass a step (the inner tape's).

Departures, for one optimizer and one step: teacher and student share the optimizer
and its learning-rate schedule (the reference has one each); the virtual step is plain
SGD at `--mpl_student_lr` (default: the optimizer's current rate) whatever the real
optimizer; the UDA term is `uda.uda_loss` (strict confidence on the unsharpened
prediction, as google-research/uda; MPL's copy keeps >= on the sharpened one) at full
weight from the first step (MPL ramps it over uda_steps); no label smoothing. The
student learns only from pseudo-labels, as the paper (which fine-tunes it on the labels
afterwards: `--train_mode=finetune --checkpoint=<this run>`).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.config import FlagError, MPL_PSEUDO_LABELS
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi
from simclr_tf.methods import uda

Metrics = dict[str, tf.Tensor]

MPL_METRICS = ("mpl_reward", "teacher_supervised_loss", "uda_loss")


def hard_pseudo_labels(logits: tf.Tensor, *, mode: str = "argmax", seed: tf.Tensor | None = None) -> tf.Tensor:
    """(N,) int32 pseudo-labels of (N, C) logits: their argmax, or one draw from their softmax.

    No gradient flows through them. "sample" needs a (2,) int `seed` (stateless: a resumed
    run draws what an uninterrupted one would).
    """
    logits = tf.stop_gradient(tf.cast(logits, tf.float32))
    if mode == "argmax":
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    if mode == "sample":
        if seed is None:
            raise ValueError("hard_pseudo_labels: mode='sample' needs a seed")
        return tf.cast(tf.random.stateless_categorical(logits, 1, seed)[:, 0], tf.int32)
    raise ValueError(f"hard_pseudo_labels: mode must be one of {MPL_PSEUDO_LABELS}, got {mode!r}")


def pseudo_label_loss(*, logits: tf.Tensor, pseudo_labels: tf.Tensor) -> tf.Tensor:
    """Mean over the N rows of CE(pseudo_labels, logits); every row counts (no mask)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(pseudo_labels, tf.int32), logits=tf.cast(logits, tf.float32)
        )
    )


def mpl_reward(*, labeled_loss_before: tf.Tensor, labeled_loss_after: tf.Tensor) -> tf.Tensor:
    """h = CE_l(theta) - CE_l(theta'): what the student's step on the pseudo-labels gained, a constant."""
    return tf.stop_gradient(tf.cast(labeled_loss_before, tf.float32) - tf.cast(labeled_loss_after, tf.float32))


def teacher_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_logits: tf.Tensor,
    strong_logits: tf.Tensor,
    pseudo_labels: tf.Tensor,
    reward: tf.Tensor | float,
    progress: tf.Tensor | float = 0.0,
    uda_weight: float = 8.0,
    temperature: float = 0.4,
    confidence: float = 0.8,
    tsa: str = "none",
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """`uda_loss(teacher) + reward * CE(pseudo_labels, strong_logits)`: the teacher's objective.

    Args:
      labeled_logits: (B, C) the teacher on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      weak_logits: (U, C) the teacher on the weak unlabeled views (UDA's target).
      strong_logits: (U, C) the teacher on the strong views of the same images.
      pseudo_labels: (U,) the labels the student learnt, drawn from `strong_logits`.
      reward: h, a scalar constant (`mpl_reward`).
      progress, temperature, confidence, tsa: as `uda.uda_loss`.
      uda_weight: weight of the UDA consistency (0: none; MPL's CIFAR-10 script: 8).
      unlabeled_labels: (U,) true labels, only for the "pseudo_label_acc" metric.

    Returns:
      `(loss, metrics)`: "teacher_supervised_loss", "uda_loss" (before its weight),
      "mask_rate" (UDA's: weak-view confidence above `confidence`), "mpl_reward" and,
      given `unlabeled_labels`, "pseudo_label_acc" of `pseudo_labels` (all of them kept).
    """
    uda_total, uda_metrics = uda.uda_loss(
        labeled_logits=labeled_logits, labels=labels, weak_logits=weak_logits, strong_logits=strong_logits,
        progress=progress, temperature=temperature, confidence=confidence, tsa=tsa,
        unlabeled_weight=uda_weight,
    )
    reward = tf.stop_gradient(tf.cast(reward, tf.float32))
    meta = pseudo_label_loss(logits=strong_logits, pseudo_labels=pseudo_labels)
    metrics = {
        "teacher_supervised_loss": uda_metrics["supervised_loss"],
        "uda_loss": uda_metrics["unlabeled_loss"],
        "mask_rate": uda_metrics["mask_rate"],
        "mpl_reward": reward,
    }
    if unlabeled_labels is not None:
        hits = tf.equal(tf.cast(pseudo_labels, tf.int32), tf.cast(tf.stop_gradient(unlabeled_labels), tf.int32))
        metrics["pseudo_label_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
    return uda_total + reward * meta, metrics


def gradient_as_loss(variables: Sequence, grads: Sequence[tf.Tensor], value: tf.Tensor) -> tf.Tensor:
    """A scalar equal to `value` whose gradient with respect to `variables` is `grads`.

    sum_i <w_i, sg(g_i)>, minus itself held constant, plus sg(value): adding it to a loss
    applies a gradient already computed without a second backward pass through the network.
    """
    dot = tf.add_n([
        tf.reduce_sum(tf.cast(w, tf.float32) * tf.stop_gradient(tf.cast(g, tf.float32)))
        for w, g in zip(variables, grads)
    ])
    return tf.stop_gradient(tf.cast(value, tf.float32)) + (dot - tf.stop_gradient(dot))


def labeled_loss_before_and_after_step(
    model: keras.Model,
    *,
    grads: Sequence[tf.Tensor],
    learning_rate: tf.Tensor | float,
    images: tf.Tensor,
    labels: tf.Tensor,
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> tuple[tf.Tensor, tf.Tensor, Metrics]:
    """CE of `model` on a labeled batch at its weights theta and at theta - learning_rate * grads.

    Both in training mode (the batch's own statistics, so the two differ by the step
    alone), through `model.stateless_call`: no variable is assigned, and the batch-norm
    moving statistics it would update are dropped. Neither carries a gradient.

    Args:
      model: a classifier whose outputs hold "logits_sup".
      grads: one tensor per `model.trainable_variables`, in that order.
      learning_rate: the virtual SGD step's rate lr_s.
      images, labels: (B, S, S, 3) and (B,) (or (B, C)) of the labeled batch.
      replica_context: given, both losses are averaged over the replicas (the global
        batch's, the same on every replica).

    Returns:
      `(loss_before, loss_after, metrics)`, metrics "supervised_loss" / "supervised_acc" at theta.
    """
    weights = [tf.stop_gradient(tf.convert_to_tensor(v)) for v in model.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    lr = tf.stop_gradient(tf.cast(learning_rate, tf.float32))
    stepped = [w - tf.cast(lr * tf.stop_gradient(tf.cast(g, tf.float32)), w.dtype) for w, g in zip(weights, grads)]

    def loss_at(values):
        outputs, _ = model.stateless_call(values, non_trainable, images, training=True)
        return losses.supervised_loss(labels=labels, logits=outputs["logits_sup"])

    before, metrics = loss_at(weights)
    after, _ = loss_at(stepped)
    if replica_context is not None:
        mean = tf.distribute.ReduceOp.MEAN
        before, after, acc = replica_context.all_reduce(mean, [before, after, metrics["supervised_acc"]])
        metrics = {"supervised_loss": before, "supervised_acc": acc}
    return tf.stop_gradient(before), tf.stop_gradient(after), metrics


class Mpl(semi.SemiSupervised):
    """`--train_mode=mpl`: a teacher (or, with --mpl_self, the model itself) taught by the student's progress."""

    name = "mpl"
    unlabeled_views = ("weak", "strong")
    # No confidence threshold on the student's pseudo-labels; the teacher's UDA term has its own flags.
    unused_flags = ("pseudo_label_threshold", "unlabeled_loss_weight")

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        super().check_flags(config, resuming=resuming)
        if config.runtime.precision == "mixed_float16":
            raise FlagError(
                "--precision: --train_mode=mpl differentiates its virtual student step without "
                "loss scaling, which float16 gradients need; use float32 or mixed_bfloat16."
            )

    @property
    def mpl(self):
        return self.config.mpl

    # -- state ------------------------------------------------------------------------
    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        super().setup(model, optimizer)
        # Two-model MPL: the teacher, trained by the same optimizer; Self-MPL holds none.
        self.teacher = None if self.mpl.mpl_self else self.build_model()

    def extra_trainable_variables(self) -> list:
        return [] if self.teacher is None else list(self.teacher.trainable_variables)

    def checkpoint_items(self) -> dict:
        items = super().checkpoint_items()
        if self.teacher is not None:
            items["mpl_teacher"] = self.teacher
        return items

    def after_restore(self, model: keras.Model, report) -> None:
        super().after_restore(model, report)
        # From --checkpoint both start at its weights; from scratch each keeps its own
        # initialisation (as the paper); resuming restored the teacher with the rest.
        if self.teacher is not None and report.source == "checkpoint":
            for teacher_weight, weight in zip(self.teacher.weights, model.weights):
                teacher_weight.assign(weight)

    # -- the step ---------------------------------------------------------------------
    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS + MPL_METRICS

    def student_learning_rate(self) -> tf.Tensor:
        """lr_s of the virtual step: --mpl_student_lr, else the rate this step applies."""
        if self.mpl.mpl_student_lr is not None:
            return tf.constant(self.mpl.mpl_student_lr, tf.float32)
        return tf.cast(self.optimizer.learning_rate, tf.float32)

    def pseudo_labels(self, logits: tf.Tensor) -> tf.Tensor:
        seed = None
        if self.mpl.mpl_pseudo_labels == "sample":
            seed = tf.random.experimental.stateless_fold_in(
                tf.constant([self.config.train.seed, 0], tf.int64), tf.cast(self.optimizer.iterations, tf.int64)
            )
            replica = tf.distribute.get_replica_context()
            if replica is not None:
                seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        return hard_pseudo_labels(logits, mode=self.mpl.mpl_pseudo_labels, seed=seed)

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)
        images, labels = batch["image"], batch["label"]
        variables = model.trainable_variables
        if self.teacher is None:
            # Self-MPL: the model labels its own strong views; one pass serves both roles.
            with tf.GradientTape() as tape:
                labeled_logits, weak_logits, strong_logits = self.logits_of(model, images, weak, strong)
                pseudo = self.pseudo_labels(strong_logits)
                student_loss = pseudo_label_loss(logits=strong_logits, pseudo_labels=pseudo)
        else:
            labeled_logits, weak_logits, strong_logits = self.logits_of(self.teacher, images, weak, strong)
            pseudo = self.pseudo_labels(strong_logits)
            with tf.GradientTape() as tape:
                student_logits = model(strong, training=True)["logits_sup"]
                student_loss = pseudo_label_loss(logits=student_logits, pseudo_labels=pseudo)
        grads = tape.gradient(student_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        replica_context = base.replica_context_if_distributed()
        if replica_context is not None:  # the global batch's g_u, as one replica would compute it
            grads = replica_context.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
        before, after, metrics = labeled_loss_before_and_after_step(
            model, grads=grads, learning_rate=self.student_learning_rate(), images=images, labels=labels,
            replica_context=replica_context,
        )
        reward = mpl_reward(labeled_loss_before=before, labeled_loss_after=after)
        teacher_total, teacher_metrics = teacher_loss(
            labeled_logits=labeled_logits, labels=labels, weak_logits=weak_logits, strong_logits=strong_logits,
            pseudo_labels=pseudo, reward=reward, progress=self.progress(), uda_weight=self.mpl.mpl_uda_weight,
            temperature=self.semi.uda_temperature, confidence=self.semi.uda_confidence, tsa=self.semi.tsa,
            unlabeled_labels=batch["unlabeled_label"],
        )
        # Self-MPL: the student's term on the same logits, so the loss is (1 + h) CE(y^) + ...
        student_term = student_loss if self.teacher is None else gradient_as_loss(variables, grads, student_loss)
        metrics.update(teacher_metrics)
        metrics["unlabeled_loss"] = student_loss
        # The labels the student learns, every one kept.
        metrics[semi.PSEUDO_LABEL_CLASSES] = common.pseudo_label_class_fractions(
            pseudo, tf.ones_like(pseudo, tf.float32), self.experiment.source.num_classes
        )
        return student_term + teacher_total, metrics
