"""What several semi-supervised methods share, written once (as USB's `algorithms/hooks`).

Pseudo-labels with a confidence mask, sharpened targets, the masked cross-entropy of
self-training, the sigmoid ramp-up and the pseudo-label monitoring metrics. All are pure
functions of tensors; probabilities, losses and metrics are float32 whatever the
logits' dtype. Targets derived from the model's own predictions are constants
(stop_gradient): a method's loss never pushes gradients into the view that made them.
"""

from __future__ import annotations

import tensorflow as tf

Metrics = dict[str, tf.Tensor]


def pseudo_labels(
    logits: tf.Tensor, *, threshold: float, inclusive: bool = True
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Hard pseudo-labels of (weak-view) logits and their confidence mask.

    Args:
      logits: (N, C); treated as constants.
      threshold: keep an example when its largest softmax probability reaches it.
      inclusive: `>=` (FixMatch, fixmatch.py:116; USB hooks/masking.py:56) when True,
        strictly `>` when False (UDA image/main.py:370; DST, Transfer-Learning-Library
        tllib/self_training/pseudo_label.py:42).

    Returns:
      `(labels, mask, probs)`: labels (N,) int32 argmax, mask (N,) float32 in {0, 1},
      probs (N, C) float32 softmax; none of them carries a gradient.
    """
    probs = tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)), axis=-1)
    confidence = tf.reduce_max(probs, axis=-1)
    keep = confidence >= threshold if inclusive else confidence > threshold
    labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
    return labels, tf.cast(keep, tf.float32), probs


def sharpen(logits: tf.Tensor, *, temperature: float) -> tf.Tensor:
    """Sharpened target distribution softmax(logits / temperature), a constant.

    Equal to MixMatch's p**(1/T) renormalised for p = softmax(logits); temperature 1
    leaves the softmax unchanged, < 1 sharpens it.
    """
    if temperature <= 0:
        raise ValueError(f"sharpen: temperature must be > 0, got {temperature}")
    logits = tf.stop_gradient(tf.cast(logits, tf.float32))
    return tf.nn.softmax(logits / temperature, axis=-1)


def masked_cross_entropy(*, logits: tf.Tensor, targets: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over ALL N rows of `mask * CE(targets, logits)` (FixMatch's normalisation).

    Masked-out rows count in the denominator, so the loss shrinks with the mask rate, as
    in fixmatch.py:118 and USB core/criterions/consistency.py:40.

    Args:
      logits: (N, C) logits that receive the gradient.
      targets: (N,) integer class ids or (N, C) target distributions.
      mask: (N,) weights, usually 0/1.
    """
    logits = tf.cast(logits, tf.float32)
    targets = tf.convert_to_tensor(targets)
    if targets.shape.rank == logits.shape.rank:
        per_example = tf.nn.softmax_cross_entropy_with_logits(
            labels=tf.cast(targets, tf.float32), logits=logits
        )
    else:
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(targets, tf.int32), logits=logits
        )
    return tf.reduce_mean(per_example * tf.stop_gradient(tf.cast(mask, tf.float32)))


def sigmoid_rampup(progress: tf.Tensor | float, *, rampup_fraction: float) -> tf.Tensor:
    """exp(-5 (1 - t)^2) with t = clip(progress / rampup_fraction, 0, 1); 1 when no ramp.

    Laine & Aila's ramp-up as Mean Teacher's pytorch/mean_teacher/ramps.py
    `sigmoid_rampup`, over the first `rampup_fraction` of training.

    Args:
      progress: step / total_steps, a float scalar (tensor or number).
      rampup_fraction: length of the ramp as a fraction of training; 0 disables it.
    """
    if rampup_fraction < 0:
        raise ValueError(f"sigmoid_rampup: rampup_fraction must be >= 0, got {rampup_fraction}")
    progress = tf.cast(progress, tf.float32)
    if rampup_fraction == 0:
        return tf.ones_like(progress)
    phase = 1.0 - tf.clip_by_value(progress / rampup_fraction, 0.0, 1.0)
    return tf.exp(-5.0 * phase * phase)


def pseudo_label_metrics(
    pseudo_labels: tf.Tensor, mask: tf.Tensor, true_labels: tf.Tensor | None = None
) -> Metrics:
    """Monitoring only: the mask rate and, given true labels, accuracy of the kept ones.

    Returns:
      {"mask_rate": mean(mask)} plus, when `true_labels` (N,) is given,
      {"pseudo_label_acc": hits among kept rows / kept rows}, 0 when none is kept
      (never NaN, which the trainer's non-finite guard would take for a divergence).
    """
    mask = tf.stop_gradient(tf.cast(mask, tf.float32))
    metrics = {"mask_rate": tf.reduce_mean(mask)}
    if true_labels is not None:
        true_labels = tf.stop_gradient(tf.cast(true_labels, tf.int32))
        hits = tf.cast(tf.equal(tf.cast(pseudo_labels, tf.int32), true_labels), tf.float32)
        metrics["pseudo_label_acc"] = tf.math.divide_no_nan(
            tf.reduce_sum(hits * mask), tf.reduce_sum(mask)
        )
    return metrics


def pseudo_label_class_fractions(
    pseudo_labels: tf.Tensor, mask: tf.Tensor, num_classes: int
) -> tf.Tensor:
    """(C,) float32 class distribution of the kept pseudo-labels; zeros when none is kept.

    Shows the bias DebiasPL and DST address: a balanced unlabeled set whose kept
    pseudo-labels pile up on a few classes.
    """
    mask = tf.stop_gradient(tf.cast(mask, tf.float32))
    one_hot = tf.one_hot(tf.cast(pseudo_labels, tf.int32), num_classes, dtype=tf.float32)
    counts = tf.reduce_sum(one_hot * mask[:, None], axis=0)  # (C,)
    return tf.math.divide_no_nan(counts, tf.reduce_sum(mask))


def mixup_draw(seed: tf.Tensor, batch_size: tf.Tensor, *, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example mixup weights lambda ~ Beta(alpha, alpha) and a random partner for each.

    Stateless: `seed` (2,) int fixes both, so a resumed run mixes as an uninterrupted one.
    Returns `(weights (N,) float32, partners (N,) int32)`.
    """
    if alpha <= 0:
        raise ValueError(f"mixup_draw: alpha must be > 0, got {alpha}")
    seeds = tf.random.experimental.stateless_split(seed, 3)
    # Beta(a, a) = G1 / (G1 + G2) for independent Gamma(a) draws.
    first = tf.random.stateless_gamma([batch_size], seeds[0], alpha=alpha)
    second = tf.random.stateless_gamma([batch_size], seeds[1], alpha=alpha)
    weights = first / tf.maximum(first + second, 1e-12)
    partners = tf.cast(tf.argsort(tf.random.stateless_uniform([batch_size], seeds[2])), tf.int32)
    return weights, partners


def mix_images(images: tf.Tensor, weights: tf.Tensor, partners: tf.Tensor) -> tf.Tensor:
    """`weights[i] * images[i] + (1 - weights[i]) * images[partners[i]]`, in the images' dtype."""
    w = tf.reshape(tf.cast(weights, images.dtype), [-1] + [1] * (images.shape.rank - 1))
    return w * images + (1 - w) * tf.gather(images, partners)
