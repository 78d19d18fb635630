"""Weighted k-NN classifier on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def knn_class_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Returns (num_queries, num_classes) vote scores.

    Features are L2-normalised; each of the k nearest training examples (cosine
    similarity s) votes for its class with weight exp(s / temperature).
    """
    bank = tf.math.l2_normalize(tf.convert_to_tensor(train_features, tf.float32), axis=1)  # (N, D)
    bank_labels = tf.convert_to_tensor(train_labels, tf.int32)
    k = min(k, int(bank.shape[0]))
    scores = []
    for start in range(0, len(query_features), chunk_size):
        query = tf.math.l2_normalize(
            tf.convert_to_tensor(query_features[start : start + chunk_size], tf.float32), axis=1
        )  # (Q, D)
        similarity = tf.matmul(query, bank, transpose_b=True)  # (Q, N)
        top_similarity, top_index = tf.math.top_k(similarity, k=k)  # (Q, k)
        weights = tf.exp(top_similarity / temperature)
        votes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)  # (Q, k, C)
        scores.append(tf.reduce_sum(votes * weights[..., None], axis=1).numpy())
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores, axis=0)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))
