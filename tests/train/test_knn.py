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


def _stream(bank, labels, query, *, batch, bank_chunk, query_batch=7, **options):
    """StreamingKnn fed in uneven batches, as the eval passes feed it."""
    streaming = knn.StreamingKnn(bank_chunk=bank_chunk, **options)
    for start in range(0, len(query), query_batch):
        streaming.add_queries(query[start : start + query_batch])
    for start in range(0, len(bank), batch):
        streaming.add_bank(bank[start : start + batch], labels[start : start + batch])
    return streaming


# Chunks of 64 rows make 3.75 chunks of the 240-example bank; 8192 holds it whole.
@pytest.mark.parametrize("k,batch,bank_chunk", [(20, 13, 64), (1, 100, 64), (5, 500, 8192), (300, 9, 128)])
def test_streamed_bank_gives_exactly_the_all_in_memory_scores(k, batch, bank_chunk):
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(240, 128)).astype(np.float32)
    labels = rng.integers(0, 10, size=240)
    # Exact duplicates with other labels in other chunks: the tie must go to the earlier one.
    bank[200:210] = bank[3:13]
    labels[200:210] = (labels[3:13] + 1) % 10
    query = np.concatenate([bank[3:13], rng.normal(size=(1100, 128)).astype(np.float32)])
    query_labels = rng.integers(0, 10, size=len(query))
    options = dict(num_classes=10, k=k, temperature=0.1)

    want = knn.knn_class_scores(bank, labels, query, **options)
    streaming = _stream(bank, labels, query, batch=batch, bank_chunk=bank_chunk, **options)
    got = streaming.scores()

    np.testing.assert_array_equal(got, want)
    assert knn.top_k_accuracy(got, query_labels, 1) == knn.top_k_accuracy(want, query_labels, 1)
    assert streaming.bank_size == 240 and streaming.num_queries == len(query)
    np.testing.assert_array_equal(streaming.bank_class_counts, np.bincount(labels, minlength=10))


def test_streaming_holds_one_bank_chunk_not_the_bank():
    rng = np.random.default_rng(3)
    bank, labels = rng.normal(size=(1000, 16)).astype(np.float32), rng.integers(0, 3, size=1000)
    streaming = _stream(bank, labels, bank[:10], batch=30, bank_chunk=64, num_classes=3)
    assert streaming.peak_bytes() == _stream(
        bank[:200], labels[:200], bank[:10], batch=30, bank_chunk=64, num_classes=3
    ).peak_bytes()
    assert streaming.peak_bytes() < bank.nbytes


def test_queries_must_come_before_the_bank():
    streaming = knn.StreamingKnn(num_classes=2)
    streaming.add_bank(np.ones((3, 4), np.float32), np.array([0, 1, 0]))
    with pytest.raises(RuntimeError, match="before the bank"):
        streaming.add_queries(np.ones((1, 4), np.float32))


def test_top_k_accuracy_breaks_ties_as_a_stable_sort():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 3, size=(200, 6)).astype(np.float32)  # many ties
    labels = rng.integers(0, 6, size=200)
    for k in (1, 2, 3):
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        want = np.mean(np.any(top == labels[:, None], axis=1))
        assert knn.top_k_accuracy(scores, labels, k) == pytest.approx(want)
