"""Weighted k-NN classifier on frozen features (InstDisc / DINO protocol).

`knn_class_scores` holds the whole memory bank; `StreamingKnn` gives the same scores
while the bank streams past in chunks, so the eval of a large train split holds only
the queries (see the README's "k-NN evaluation" for the arithmetic).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def cosine_similarity(query: tf.Tensor, bank: tf.Tensor) -> tf.Tensor:
    """(Q, B) dot products of L2-normalised float32 rows, rounded to float32.

    Computed in float64: TensorFlow's oneDNN float32 matmul picks its kernel by shape,
    so a 64-row bank chunk and the whole bank gave different last bits; the float64
    product of float32 inputs does not depend on the shape.
    """
    product = tf.matmul(tf.cast(query, tf.float64), tf.cast(bank, tf.float64), transpose_b=True)
    return tf.cast(product, tf.float32)


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
    """Returns (num_queries, num_classes) vote scores, with the whole bank in memory.

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
        similarity = cosine_similarity(query, bank)  # (Q, N)
        top_similarity, top_index = tf.math.top_k(similarity, k=k)  # (Q, k)
        weights = tf.exp(top_similarity / temperature)
        votes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)  # (Q, k, C)
        scores.append(tf.reduce_sum(votes * weights[..., None], axis=1).numpy())
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores, axis=0)


class _Rechunker:
    """Regroups rows arriving in batches of any size into blocks of `rows` rows."""

    def __init__(self, rows: int):
        self.rows = rows
        self._parts: list[np.ndarray] = []
        self._count = 0

    def add(self, values: np.ndarray) -> list[np.ndarray]:
        """Stores `values`; returns the blocks of exactly `rows` rows now complete."""
        self._parts.append(values)
        self._count += len(values)
        blocks = []
        while self._count >= self.rows:
            joined = np.concatenate(self._parts)
            blocks.append(joined[: self.rows])
            self._parts, self._count = [joined[self.rows :]], len(joined) - self.rows
        return blocks

    def flush(self) -> list[np.ndarray]:
        """The remaining rows (fewer than `rows`) as one block, if any."""
        if not self._count:
            return []
        joined = np.concatenate(self._parts)
        self._parts, self._count = [], 0
        return [joined]


class StreamingKnn:
    """`knn_class_scores` of fixed queries against a memory bank that streams past.

    Give every query first (`add_queries`), then the bank in any number of batches
    (`add_bank`), then read `scores()`. Only the L2-normalised queries, one bank chunk
    (`bank_chunk` rows) and each query's running k best (similarity, label) are held,
    so memory does not grow with the bank. The scores equal `knn_class_scores` on the
    concatenated bank bit for bit: the same neighbours with the same ties (the earlier
    bank example wins, as `tf.math.top_k`), summed in the same order, from the same
    similarities. For the last, chunks are whole multiples of 64 rows, like the old
    code's 1,024-query blocks: `tf.math.l2_normalize` computes its reciprocal square
    roots in SIMD blocks and the leftover rows by another path, which can differ in
    the last bit, so only block-aligned chunks normalise every row as the whole bank
    does.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        k: int = 20,
        temperature: float = 0.07,
        query_chunk: int = 1024,
        bank_chunk: int = 8192,
    ):
        if k < 1:
            raise ValueError(f"--knn_k={k} must be at least 1.")
        if query_chunk % 64 or bank_chunk % 64:
            raise ValueError(f"Chunks must be multiples of 64 rows, got {query_chunk} and {bank_chunk}.")
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.bank_chunk = bank_chunk
        self.query_chunk = query_chunk
        self._query_rechunker: _Rechunker | None = _Rechunker(query_chunk)
        self._query_labels: list[np.ndarray] = []
        self._queries: list[tf.Tensor] = []  # normalised (<= query_chunk, D) float32 blocks
        # Per query block: the k best so far, similarity-descending (ties: earlier first).
        self._top_similarity: list[tf.Tensor] = []
        self._top_label: list[tf.Tensor] = []
        self._bank_rechunker = _Rechunker(bank_chunk)
        self._label_rechunker = _Rechunker(bank_chunk)  # same sizes, so blocks pair up
        self.bank_size = 0
        self.bank_class_counts = np.zeros([num_classes], np.int64)
        self.num_queries = 0
        self.dim = 0

    def add_queries(self, features: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Appends queries (and their labels, kept in `query_labels` for the accuracy)."""
        if self._query_rechunker is None:
            raise RuntimeError("add_queries after add_bank: give every query before the bank.")
        if labels is not None:
            self._query_labels.append(np.asarray(labels))
        self.num_queries += len(features)
        self.dim = features.shape[1]
        for block in self._query_rechunker.add(np.asarray(features, np.float32)):
            self._add_query_block(block)

    @property
    def query_labels(self) -> np.ndarray:
        return np.concatenate(self._query_labels) if self._query_labels else np.zeros([0], np.int64)

    def _add_query_block(self, block: np.ndarray) -> None:
        self._queries.append(tf.math.l2_normalize(tf.convert_to_tensor(block, tf.float32), axis=1))
        self._top_similarity.append(tf.zeros([len(block), 0], tf.float32))
        self._top_label.append(tf.zeros([len(block), 0], tf.int32))

    def _close_queries(self) -> None:
        if self._query_rechunker is not None:
            for block in self._query_rechunker.flush():
                self._add_query_block(block)
            self._query_rechunker = None

    def add_bank(self, features: np.ndarray, labels: np.ndarray) -> None:
        self._close_queries()
        labels = np.asarray(labels, np.int32)
        self.bank_size += len(labels)
        self.bank_class_counts += np.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        blocks = self._bank_rechunker.add(np.asarray(features, np.float32))
        for block, block_labels in zip(blocks, self._label_rechunker.add(labels)):
            self._merge(block, block_labels)

    def _merge(self, block: np.ndarray, block_labels: np.ndarray) -> None:
        bank = tf.math.l2_normalize(tf.convert_to_tensor(block), axis=1)  # (B, D)
        bank_labels = tf.convert_to_tensor(block_labels)  # (B,)
        for i, query in enumerate(self._queries):
            similarity = cosine_similarity(query, bank)  # (Q, B)
            # The running best come first: on equal similarity top_k keeps the lower
            # position, i.e. the earlier bank example, as over the whole bank at once.
            candidates = tf.concat([self._top_similarity[i], similarity], axis=1)  # (Q, k' + B)
            candidate_labels = tf.concat(
                [self._top_label[i], tf.broadcast_to(bank_labels, similarity.shape)], axis=1
            )
            k = min(self.k, int(candidates.shape[1]))
            self._top_similarity[i], position = tf.math.top_k(candidates, k=k)  # (Q, k)
            self._top_label[i] = tf.gather(candidate_labels, position, batch_dims=1)

    def scores(self) -> np.ndarray:
        """(num_queries, num_classes) vote scores over the bank given so far."""
        self._close_queries()
        for block, block_labels in zip(self._bank_rechunker.flush(), self._label_rechunker.flush()):
            self._merge(block, block_labels)
        scores = []
        for top_similarity, top_label in zip(self._top_similarity, self._top_label):
            weights = tf.exp(top_similarity / self.temperature)
            votes = tf.one_hot(top_label, self.num_classes)  # (Q, k, C)
            scores.append(tf.reduce_sum(votes * weights[..., None], axis=1).numpy())
        if not scores:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(scores, axis=0)

    def peak_bytes(self) -> int:
        """Estimated peak of this evaluator's own arrays while the bank streams past.

        The normalised queries and their k best (similarity, label), plus a chunk's
        working set: its batches, their concatenation, the squares, the normalised
        chunk and its float64 copy (6 float32-sized copies), and a query block's float64
        copy, float64 and float32 similarities, candidates and labels.
        The final (queries, classes) scores come after the chunks are freed.
        """
        float_bytes = 4
        queries = self.num_queries * self.dim * float_bytes
        best = self.num_queries * self.k * 2 * float_bytes
        chunk_rows = min(self.bank_chunk, self.bank_size)
        chunk = 6 * chunk_rows * self.dim * float_bytes
        query_rows = min(self.query_chunk, self.num_queries)
        merge = query_rows * (2 * self.dim + 5 * (self.k + chunk_rows)) * float_bytes
        return queries + best + chunk + merge


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties: lower class first)."""
    if len(labels) == 0:
        return float("nan")
    labels = np.asarray(labels)
    label_scores = scores[np.arange(len(labels)), labels][:, None]
    # The label's rank in a stable descending sort, without sorting (Q, C) indices.
    higher = np.sum(scores > label_scores, axis=1)
    tied_before = np.sum((scores == label_scores) & (np.arange(scores.shape[1]) < labels[:, None]), axis=1)
    return float(np.mean(higher + tied_before < k))
