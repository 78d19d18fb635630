import numpy as np
import pytest

from simclr_tf.train import knn


def _numpy_knn_scores(bank, bank_labels, query, num_classes, k, temperature):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    scores = np.zeros((len(query), num_classes))
    for i, q in enumerate(query):
        similarity = bank @ q
        nearest = np.argsort(-similarity, kind="stable")[:k]
        for j in nearest:
            scores[i, bank_labels[j]] += np.exp(similarity[j] / temperature)
    return scores


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.5), (50, 1.0)])
def test_scores_match_numpy(k, temperature):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    query = rng.normal(size=(9, 6)).astype(np.float32)
    got = knn.knn_class_scores(bank, labels, query, num_classes=4, k=k, temperature=temperature, chunk_size=4)
    want = _numpy_knn_scores(bank, labels, query, 4, min(k, 40), temperature)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(1)
    centers = np.eye(3, 8) * 10
    bank_labels = np.repeat(np.arange(3), 20)
    bank = centers[bank_labels] + rng.normal(size=(60, 8))
    query_labels = np.array([0, 1, 2, 2, 1])
    query = centers[query_labels] + rng.normal(size=(5, 8))
    scores = knn.knn_class_scores(bank, bank_labels, query, num_classes=3, k=5)
    assert knn.top_k_accuracy(scores, query_labels, 1) == 1.0


def test_top_k_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert knn.top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert knn.top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert knn.top_k_accuracy(scores, labels, 5) == 1.0
