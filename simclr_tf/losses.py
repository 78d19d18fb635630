"""SimCLRv2 objectives: NT-Xent, supervised cross-entropy, distillation, weight decay.

Every loss is a pure, keyword-only function of tensors that returns `(loss, metrics)`,
where `metrics` holds scalar tensors named as the trainer logs them. Losses are computed
in float32 whatever the model's compute dtype, so mixed precision does not change them.
Cross-replica gathering (NT-Xent only) is requested by passing the replica context.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import tensorflow as tf

# Subtracted from self-similarity logits so that softmax gives them (numerically) zero
# weight. A finite value rather than -inf keeps softmax/cross-entropy free of NaNs.
LARGE_NUM = 1e9

Metrics = dict[str, tf.Tensor]


def nt_xent_loss(
    *,
    projections: tf.Tensor,
    temperature: float,
    hidden_norm: bool = True,
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """Normalised-temperature cross-entropy (SimCLR contrastive loss).

    Args:
      projections: (2B, D), view-major: rows [:B] are view 1 and rows [B:] view 2 of
        the same B examples on this replica.
      temperature: softmax temperature.
      hidden_norm: L2-normalise the projections first (cosine similarity).
      replica_context: `tf.distribute.get_replica_context()` inside `strategy.run`, or
        None. With more than one replica in sync, the negatives are gathered from all
        replicas; gradients flow back through the gathered copies, so R replicas of a
        global batch give the loss and gradients of one replica on the whole batch
        (after the usual division of the loss by R and sum of the gradients). Every
        replica must hold the same number of examples.

    Returns:
      `(loss, metrics)`; loss is the mean over this replica's examples of
      `loss_a + loss_b` (each view as anchor), as the original.
    """
    hidden = tf.cast(projections, tf.float32)
    if hidden_norm:
        hidden = tf.math.l2_normalize(hidden, axis=-1)
    hidden1, hidden2 = tf.split(hidden, 2, axis=0)  # (B, D) each
    batch_size = tf.shape(hidden1)[0]

    if replica_context is not None and replica_context.num_replicas_in_sync > 1:
        num_replicas = replica_context.num_replicas_in_sync
        # all_gather's registered gradient all-reduces (sums) the upstream gradients
        # and hands each replica its own slice, so the negatives seen by other replicas
        # push gradients back here. One batched call gathers both views.
        hidden1_large, hidden2_large = replica_context.all_gather([hidden1, hidden2], axis=0)
        # The label offset below assumes equal shards. With unequal ones at least one
        # replica has B * R != gathered size, so this catches them.
        tf.debugging.assert_equal(
            tf.shape(hidden1_large)[0],
            batch_size * num_replicas,
            message="nt_xent_loss: every replica needs the same per-replica batch size",
        )
        replica_id = tf.cast(replica_context.replica_id_in_sync_group, tf.int32)
        offset = replica_id * batch_size
    else:
        hidden1_large, hidden2_large = hidden1, hidden2
        offset = 0
    enlarged_batch_size = tf.shape(hidden1_large)[0]  # N = B * R

    # Index of each local example's positive among the gathered rows (its own row in
    # the other view's block) and of its self-similarity (same row, same view).
    labels = tf.range(batch_size) + offset  # (B,)
    self_mask = tf.one_hot(labels, enlarged_batch_size)  # (B, N)

    logits_aa = tf.matmul(hidden1, hidden1_large, transpose_b=True) / temperature  # (B, N)
    logits_aa -= self_mask * LARGE_NUM
    logits_bb = tf.matmul(hidden2, hidden2_large, transpose_b=True) / temperature
    logits_bb -= self_mask * LARGE_NUM
    logits_ab = tf.matmul(hidden1, hidden2_large, transpose_b=True) / temperature
    logits_ba = tf.matmul(hidden2, hidden1_large, transpose_b=True) / temperature

    # Over the 2N candidates [other view | same view]; the positive sits in the first block.
    loss_a = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.concat([logits_ab, logits_aa], axis=1)
    )
    loss_b = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.concat([logits_ba, logits_bb], axis=1)
    )
    loss = tf.reduce_mean(loss_a + loss_b)

    # Metrics on logits_ab only, as the original's update_pretrain_metrics_train.
    logits_ab = tf.stop_gradient(logits_ab)
    hits = tf.equal(tf.argmax(logits_ab, axis=1, output_type=tf.int32), labels)
    prob = tf.nn.softmax(logits_ab)
    entropy = -tf.reduce_mean(tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))
    metrics = {
        "contrast_loss": loss,
        "contrast_acc": tf.reduce_mean(tf.cast(hits, tf.float32)),
        "contrast_entropy": entropy,
    }
    return loss, metrics


def supervised_loss(*, labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, Metrics]:
    """Mean softmax cross-entropy over the local batch.

    Args:
      labels: (B,) integer class ids or (B, C) one-hot / soft targets.
      logits: (B, C).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == logits.shape.rank:
        targets = tf.cast(labels, tf.float32)
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        label_ids = tf.argmax(targets, axis=-1, output_type=tf.int32)
    else:
        label_ids = tf.cast(labels, tf.int32)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=label_ids, logits=logits)
    loss = tf.reduce_mean(per_example)
    hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), label_ids)
    return loss, {"supervised_loss": loss, "supervised_acc": tf.reduce_mean(tf.cast(hits, tf.float32))}


def distillation_loss(
    *, teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float = 1.0
) -> tuple[tf.Tensor, Metrics]:
    """SimCLRv2 distillation: -sum_y P_T(y|x; tau) log P_S(y|x; tau), mean over the batch.

    The teacher is a fixed target (stop_gradient). No tau**2 factor, as in the paper.
    """
    teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    student_logits = tf.cast(student_logits, tf.float32)
    teacher_prob = tf.nn.softmax(teacher_logits / temperature, axis=-1)
    per_example = tf.nn.softmax_cross_entropy_with_logits(
        labels=teacher_prob, logits=student_logits / temperature
    )
    loss = tf.reduce_mean(per_example)
    agree = tf.equal(
        tf.argmax(teacher_logits, axis=-1, output_type=tf.int32),
        tf.argmax(student_logits, axis=-1, output_type=tf.int32),
    )
    return loss, {"distill_loss": loss, "distill_agreement": tf.reduce_mean(tf.cast(agree, tf.float32))}


def weight_decay_loss(variables: Sequence, weight_decay: float) -> tf.Tensor:
    """`weight_decay * sum(l2_loss(v))` (l2_loss = sum(v**2) / 2); 0.0 when there are none."""
    l2_losses = [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables]
    if not l2_losses or not weight_decay:
        return tf.constant(0.0, tf.float32)
    return weight_decay * tf.add_n(l2_losses)


def variables_with_loss_weight_decay(trainable_variables: Iterable, optimizer_name: str) -> list:
    """Variables whose L2 penalty belongs in the loss, as the original's add_weight_decay.

    LARS decays all but the excluded variables itself, so for 'lars' only the
    supervised head's kernels (excluded from LARS) are decayed through the loss; AdamW
    decays in the optimizer (decoupled), so nothing is. For the other optimizers every
    trainable variable but normalisation parameters and a ViT's embeddings (`NO_DECAY`)
    is. Matched as substrings of `variable.path` (the stable Keras 3 name).
    """
    from simclr_tf.optim.factory import NO_DECAY

    if optimizer_name == "adamw":
        return []
    if optimizer_name == "lars":
        return [
            v
            for v in trainable_variables
            if "head_supervised" in _path(v) and _leaf_name(v) != "bias"
        ]
    return [v for v in trainable_variables if not any(p in _path(v) for p in NO_DECAY)]


def _path(variable) -> str:
    # Keras 3 variables carry the full layer path; raw tf.Variables only a name.
    return getattr(variable, "path", None) or variable.name


def _leaf_name(variable) -> str:
    # "head_supervised/dense/bias" -> "bias"; also strips a tf.Variable's ":0".
    return _path(variable).rsplit("/", 1)[-1].split(":")[0]
