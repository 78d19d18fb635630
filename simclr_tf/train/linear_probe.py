"""Linear evaluation on frozen features: a logistic regression fit at eval time.

The linear head trained alongside pretraining (`--lineareval_while_pretraining`) sees
features that move under it, at the contrastive learning rate, so on short runs it
under-reports what the representation holds. This probe instead fits a multinomial
logistic regression on the final features of the train split and scores the eval
split, as the linear evaluation protocol of the papers does (there with SGD on
augmented images; here full-batch on un-augmented features, which takes seconds).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def fit_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    steps: int = 500,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fits softmax regression on standardised features; returns (mean, scale, kernel, bias).

    Full-batch Adam from zeros, so the fit is deterministic. Features are standardised
    with the train mean and standard deviation (ReLU features have very different
    scales per channel); `l2` penalises the kernel (mean loss + l2 * |kernel|^2 / 2).
    """
    x = np.asarray(features, np.float32)  # (N, D)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    x = tf.constant((x - mean) / scale)
    y = tf.constant(np.asarray(labels, np.int32))
    kernel = tf.Variable(tf.zeros([x.shape[1], num_classes]))  # (D, C)
    bias = tf.Variable(tf.zeros([num_classes]))
    # A plain Adam update written out: a Keras optimizer would add variables to the
    # caller's tracking and a checkpoint; this is a throwaway fit.
    slots = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in (kernel, bias)]
    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-8

    @tf.function
    def fit() -> None:
        for step in tf.range(1, steps + 1):
            with tf.GradientTape() as tape:
                logits = tf.matmul(x, kernel) + bias  # (N, C)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
                loss += 0.5 * l2 * tf.reduce_sum(tf.square(kernel))
            grads = tape.gradient(loss, [kernel, bias])
            t = tf.cast(step, tf.float32)
            correction = tf.sqrt(1.0 - beta_2**t) / (1.0 - beta_1**t)
            for variable, grad, (m, v) in zip((kernel, bias), grads, slots):
                m.assign(beta_1 * m + (1.0 - beta_1) * grad)
                v.assign(beta_2 * v + (1.0 - beta_2) * tf.square(grad))
                variable.assign_sub(learning_rate * correction * m / (tf.sqrt(v) + epsilon))

    fit()
    return mean, scale, kernel.numpy(), bias.numpy()


def linear_probe_logits(
    probe: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], features: np.ndarray
) -> np.ndarray:
    """(Q, C) logits of a probe from `fit_linear_probe` for (Q, D) features."""
    mean, scale, kernel, bias = probe
    return ((np.asarray(features, np.float32) - mean) / scale) @ kernel + bias


def linear_probe_top_1_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    query_labels: np.ndarray,
    *,
    num_classes: int,
) -> float:
    """Top-1 accuracy on the queries of a probe fit on the train features."""
    if len(query_labels) == 0:
        return float("nan")
    probe = fit_linear_probe(train_features, train_labels, num_classes=num_classes)
    predictions = np.argmax(linear_probe_logits(probe, query_features), axis=1)
    return float(np.mean(predictions == np.asarray(query_labels)))
