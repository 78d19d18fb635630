"""The k-NN evaluation: streamed bank, its cap, and the raw-pixel baseline."""

import json

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config, FlagError
from simclr_tf.data import sources
from simclr_tf.train import evaluation, knn
from simclr_tf.train.experiment import Experiment


def knn_config(*, bank_size: int = 0, seed: int = 0, image_size: int = 32, train_split: str = "train[:96]") -> Config:
    """An untrained ResNet-10 x0.25 evaluated on a few mnist5k digits; every field the tests use is set."""
    return Config().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": image_size,
               "proj_head_mode": "nonlinear", "num_proj_layers": 2, "sk_ratio": 0.0, "se_ratio": 0.0},
        data={"dataset": "mnist5k", "train_split": train_split, "eval_split": "validation[:40]"},
        train={"train_mode": "pretrain", "mode": "eval", "lineareval_while_pretraining": True,
               "train_steps": 1, "train_batch_size": 16, "eval_batch_size": 32, "eval_steps": 0,
               "knn_eval": True, "knn_k": 20, "knn_temperature": 0.07, "knn_bank_size": bank_size,
               "seed": seed, "eval_name": None},
        runtime={"strategy": "default", "precision": "float32"},
    )


def build(config: Config, model_dir) -> tuple[Experiment, tf.keras.Model]:
    experiment = Experiment.create(config, str(model_dir))
    with experiment.strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = experiment.build_model()
    return experiment, model


def test_streamed_knn_eval_equals_the_all_in_memory_one(tmp_path, monkeypatch):
    # Chunks of 64 rows: the 96-example bank streams past in two.
    monkeypatch.setattr(evaluation, "KNN_BANK_CHUNK", 64)
    experiment, model = build(knn_config(bank_size=0), tmp_path)
    learned, _ = evaluation.knn_evaluators(experiment, model)

    bank, bank_labels = evaluation.extract_features(experiment, model, "train[:96]", limit=False)
    query, query_labels = evaluation.extract_features(experiment, model, "validation[:40]", limit=True)
    want = knn.knn_class_scores(bank, bank_labels, query, num_classes=10, k=20, temperature=0.07)

    got = learned.scores()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(learned.query_labels, query_labels)
    for k in (1, 5):
        assert knn.top_k_accuracy(got, learned.query_labels, k) == knn.top_k_accuracy(want, query_labels, k)
    assert learned.bank_size == 96 and learned.dim == bank.shape[1]


def _numpy_weighted_knn(bank, bank_labels, query, num_classes, k, temperature):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    similarity = query @ bank.T  # (Q, N)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(query), num_classes))
    for i, row in enumerate(nearest):
        np.add.at(scores[i], bank_labels[row], np.exp(similarity[i, row] / temperature))
    return scores


def test_raw_pixel_knn_matches_numpy_on_the_digits(tmp_path):
    # At 28 px the eval view of a 28x28 digit is the digit itself, scaled to [0, 1].
    experiment, model = build(knn_config(image_size=28), tmp_path)
    _, pixels = evaluation.knn_evaluators(experiment, model)

    source = sources.Mnist5kSource()
    bank, bank_labels = source._select("train[:96]")
    query, query_labels = source._select("validation[:40]")
    flat = lambda images: images.reshape(len(images), -1).astype(np.float64) / 255.0  # noqa: E731
    want = _numpy_weighted_knn(flat(bank), bank_labels, flat(query), 10, 20, 0.07)

    got = pixels.scores()
    assert pixels.dim == 28 * 28 * 3
    np.testing.assert_array_equal(pixels.query_labels, query_labels)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert knn.top_k_accuracy(got, query_labels, 1) == np.mean(np.argmax(want, axis=1) == query_labels)


def _bank(experiment: Experiment) -> tuple[np.ndarray, np.ndarray]:
    subset = evaluation.knn_bank_subset(experiment)
    batches = list(experiment.eval_dataset(experiment.config.data.train_split, labeled_subset=subset))
    return (np.concatenate([b["image"].numpy() for b in batches]),
            np.concatenate([b["label"].numpy() for b in batches]))


def test_bank_cap_is_class_balanced_seeded_and_of_the_cap_size(tmp_path):
    split = "train[:300]"
    experiment = Experiment.create(knn_config(bank_size=40, train_split=split), str(tmp_path / "a"))
    images, labels = _bank(experiment)
    assert len(labels) == 40
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 4))

    again, _ = _bank(Experiment.create(knn_config(bank_size=40, train_split=split), str(tmp_path / "b")))
    np.testing.assert_array_equal(again, images)
    other, other_labels = _bank(
        Experiment.create(knn_config(bank_size=40, seed=1, train_split=split), str(tmp_path / "c"))
    )
    assert len(other_labels) == 40 and not np.array_equal(other, images)

    # At or under the cap, and with no cap, the bank is the whole split.
    for bank_size in (300, 0):
        experiment = Experiment.create(knn_config(bank_size=bank_size, train_split=split), str(tmp_path / "d"))
        assert evaluation.knn_bank_subset(experiment) is None
        assert len(_bank(experiment)[1]) == 300


def test_evaluate_reports_raw_pixel_knn_and_the_bank_used(tmp_path, monkeypatch):
    used = []
    knn_evaluators = evaluation.knn_evaluators
    monkeypatch.setattr(evaluation, "knn_evaluators", lambda *a: used.append(knn_evaluators(*a)) or used[-1])
    # 40 px: the raw-pixel k-NN reads the eval view resized to 32x32.
    experiment, model = build(knn_config(bank_size=40, image_size=40, train_split="train[:300]"), tmp_path)
    result = evaluation.evaluate(experiment, model, global_step=0)

    for name in ("eval/knn_top_1_accuracy", "eval/knn_raw_pixels_top_1_accuracy",
                 "eval/knn_raw_pixels_top_5_accuracy", "eval/label_top_1_accuracy"):
        assert 0.0 <= result[name] <= 1.0, name
    assert result["eval/knn_raw_pixels_top_1_accuracy"] <= result["eval/knn_raw_pixels_top_5_accuracy"]
    assert result["eval/knn_bank_size"] == 40
    assert json.loads((tmp_path / "result.json").read_text()) == result
    [(learned, pixels)] = used
    assert pixels.dim == 32 * 32 * 3 and pixels.bank_size == learned.bank_size == 40


def test_a_bank_smaller_than_the_classes_is_refused(tmp_path):
    with pytest.raises(FlagError, match="^--knn_bank_size=5 .* 10 classes"):
        Experiment.create(knn_config(bank_size=5), str(tmp_path))
