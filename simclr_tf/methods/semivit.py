"""Semi-ViT (Cai et al., NeurIPS 2022): an EMA teacher's pseudo-labels with probabilistic pseudo mixup.

The third stage of Semi-ViT's pipeline (pretrain -> supervised fine-tuning -> this), so it
starts from a fine-tuned classifier: --checkpoint is required. A step:
  - the teacher, the weight average of the student (--ema_decay), in inference mode as the
    reference's `model_ema.ema.eval()`, labels the weak view of each unlabeled image:
    y_i = argmax, confidence c_i = max softmax (FixMatch's pseudo-labels come from the
    trained model itself; the average is steadier);
  - probabilistic pseudo mixup: the strong view of image i is blended with that of its
    partner j = perm(i), a random permutation of the batch, with the confidences' weight
    lam_i = c_i / (c_i + c_j), and learns lam_i onehot(y_i) + (1 - lam_i) onehot(y_j);
  - a mixed row counts when max(c_i, c_j) >= --pseudo_label_threshold (either image is
    confident); the loss is CE(labeled) + w_u * mean over all rows of mask * CE.
Reference: amazon-science/semi-vit engine_semi.py:97-125 (the step), util/mixup.py:91-121
(`ProbPseudoMixup._mix_elem`: the weights and the mask's max). Defaults, main_semi.py:178-183:
threshold 0.7, lambda_u 5, mu 5 (its recipes, SEMIVIT.md, use threshold 0.5-0.7, lambda_u 5).
Its EMA decay is 0.9999 (main_semi.py:60); --ema_decay is shared by every method
(default 0.999), so set it for the run's length: the reference's 100 ImageNet epochs are
~200k steps, 20 time constants of 0.9999.

Departures: images are blended (mixup); the reference's default timm settings (mixup 0.8,
cutmix 1.0, switch 0.5) cut-and-paste half of the pairs instead, with the same weights as
areas. No label smoothing (the reference smooths targets by 0.1). The labeled images are
not mixed, as its 1%-label recipe (--disable_x_mixup). The permutation is drawn over the
global batch (the strong views and the teacher's logits are gathered across replicas),
where the reference permutes each GPU's batch: a step is then the same function of the
global batch at any replica count. The average starts at --checkpoint's trained weights
(the reference loads the checkpoint's own EMA when it has one).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi

Metrics = dict[str, tf.Tensor]


def pseudo_mixup_weights(*, teacher_logits: tf.Tensor, partner_teacher_logits: tf.Tensor) -> tf.Tensor:
    """(U,) float32 lam_i = c_i / (c_i + c_j), c the teacher's max softmax; a constant.

    Args:
      teacher_logits: (U, C) the teacher on the weak views of the mixed rows' own images.
      partner_teacher_logits: (U, C) the same for each row's partner.
    """
    confidence = _confidence(teacher_logits)
    partner_confidence = _confidence(partner_teacher_logits)
    return confidence / (confidence + partner_confidence)  # c >= 1/C > 0


def mix_with_partners(images: tf.Tensor, partner_images: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """`weights[i] * images[i] + (1 - weights[i]) * partner_images[i]`, in the images' dtype."""
    w = tf.reshape(tf.cast(weights, images.dtype), [-1] + [1] * (images.shape.rank - 1))
    return w * images + (1 - w) * partner_images


def probabilistic_pseudo_mixup_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    teacher_logits: tf.Tensor,
    partner_teacher_logits: tf.Tensor,
    mixed_logits: tf.Tensor,
    threshold: float = 0.7,
    unlabeled_weight: float = 5.0,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """`CE(labeled) + unlabeled_weight * mean_i[mask_i * CE(mixed target_i, mixed_logits_i)]`.

    Row i of the unlabeled part is image i mixed with its partner j (`mix_with_partners`
    with `pseudo_mixup_weights`): target lam_i onehot(y_i) + (1 - lam_i) onehot(y_j),
    mask_i = [max(c_i, c_j) >= threshold], y and c the teacher's argmax and max softmax.
    A row whose partner is itself is FixMatch's term with the teacher's pseudo-label.

    Args:
      labeled_logits: (B, C) the student on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      teacher_logits: (U, C) the teacher on the weak views of the rows' images; targets
        only, no gradient flows into them.
      partner_teacher_logits: (U, C) the teacher on the weak views of their partners.
      mixed_logits: (U, C) the student on the mixed strong views.
      threshold: a row counts when the confidence of its image or its partner's reaches it.
      unlabeled_weight: lambda_u.
      unlabeled_labels: (U,) true labels of the rows' own images, only for "pseudo_label_acc".

    Returns:
      `(loss, metrics)`: "unlabeled_loss" before its weight, averaged over all U rows
      (engine_semi.py:120); "mask_rate" and "pseudo_label_acc" of the teacher's own
      (unmixed) pseudo-labels, FixMatch's metrics; "mixed_mask_rate" the rows the loss keeps.
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    num_classes = teacher_logits.shape[-1]
    pseudo, confident, _ = common.pseudo_labels(teacher_logits, threshold=threshold)
    partner_pseudo, partner_confident, _ = common.pseudo_labels(partner_teacher_logits, threshold=threshold)
    lam = pseudo_mixup_weights(teacher_logits=teacher_logits, partner_teacher_logits=partner_teacher_logits)[:, None]
    targets = lam * tf.one_hot(pseudo, num_classes) + (1.0 - lam) * tf.one_hot(partner_pseudo, num_classes)
    mask = tf.maximum(confident, partner_confident)  # max(c_i, c_j) >= threshold
    unsup_loss = common.masked_cross_entropy(logits=mixed_logits, targets=targets, mask=mask)
    metrics["unlabeled_loss"] = unsup_loss
    metrics.update(common.pseudo_label_metrics(pseudo, confident, unlabeled_labels))
    metrics["mixed_mask_rate"] = tf.reduce_mean(mask)
    return sup_loss + unlabeled_weight * unsup_loss, metrics


def _confidence(logits: tf.Tensor) -> tf.Tensor:
    return tf.reduce_max(tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)), axis=-1), axis=-1)


class SemiVit(semi.SemiSupervised):
    """`--train_mode=semivit`: EMA-teacher pseudo-labels on confidence-weighted mixes of strong views."""

    name = "semivit"
    unlabeled_views = ("weak", "strong")
    # amazon-science/semi-vit main_semi.py:178-183.
    defaults = {"unlabeled_batch_ratio": 5, "pseudo_label_threshold": 0.7, "unlabeled_loss_weight": 5.0}

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        super().check_flags(config, resuming=resuming)
        base.require_checkpoint(config, resuming=resuming, what=(
            "--train_mode=semivit is Semi-ViT's semi-supervised fine-tuning of a trained classifier; "
            "pass the model_dir of a finetune run (e.g. flags/cifar10_folder_finetune_1pct.cfg's)."))

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS + ("mixed_mask_rate",)

    def permutation(self, size: tf.Tensor) -> tf.Tensor:
        """(size,) int32 random permutation of the global unlabeled batch; depends on (--seed, step) only.

        Stateless and the same on every replica, so a resumed or a multi-replica run mixes
        the pairs an uninterrupted single-replica run would.
        """
        seed = tf.random.experimental.stateless_fold_in(
            tf.constant([self.config.train.seed, 0], tf.int64), tf.cast(self.optimizer.iterations, tf.int64)
        )
        return tf.cast(tf.argsort(tf.random.stateless_uniform([size], seed)), tf.int32)

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)  # (U, S, S, 3) each, this replica's
        # Targets only. (The tape would otherwise differentiate the gathers below: the
        # average's variables are trainable tf.Variables under its Keras trainable=False.)
        teacher_logits = tf.stop_gradient(self.average.model(weak, training=False)["logits_sup"])  # (U, C)
        # The global batch's strong views and teacher logits, in replica order.
        pool_strong, pool_logits, first = strong, teacher_logits, 0
        replica_context = base.replica_context_if_distributed()
        if replica_context is not None:
            pool_strong, pool_logits = (
                tf.stop_gradient(replica_context.all_gather(t, axis=0)) for t in (strong, teacher_logits)
            )
            first = replica_context.replica_id_in_sync_group * tf.shape(strong)[0]
        rows = first + tf.range(tf.shape(strong)[0])
        partners = tf.gather(self.permutation(tf.shape(pool_strong)[0]), rows)  # (U,) into the pool
        partner_logits = tf.gather(pool_logits, partners)
        weights = pseudo_mixup_weights(teacher_logits=teacher_logits, partner_teacher_logits=partner_logits)
        mixed = mix_with_partners(strong, tf.gather(pool_strong, partners), weights)
        labeled_logits, mixed_logits = self.logits_of(model, batch["image"], mixed)
        loss, metrics = probabilistic_pseudo_mixup_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            teacher_logits=teacher_logits,
            partner_teacher_logits=partner_logits,
            mixed_logits=mixed_logits,
            threshold=self.pseudo_label_threshold,
            unlabeled_weight=self.unlabeled_loss_weight,
            unlabeled_labels=batch["unlabeled_label"],
        )
        return loss, self.with_class_fractions(metrics, teacher_logits)
