"""Evaluation: supervised-head accuracy and/or weighted k-NN, written as result.json."""

from __future__ import annotations

import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from simclr_tf import data as data_lib
from simclr_tf import distribute
from simclr_tf import losses
from simclr_tf.train import knn
from simclr_tf.train import linear_probe
from simclr_tf.train import steps as steps_lib
from simclr_tf.train.experiment import Experiment, write_json


def evaluate(experiment: Experiment, model: keras.Model, global_step: int) -> dict[str, float]:
    """Evaluates `model` on the eval split; writes summaries and result(_<step>).json."""
    cfg = experiment.config
    result: dict[str, float] = {}
    has_head = getattr(model, "supervised_head", None) is not None
    if has_head:
        result.update(_supervised_metrics(experiment, model))
    if cfg.train.knn_eval or not has_head:
        result.update(_knn_metrics(experiment, model))
    if cfg.train.linear_probe_eval:
        result.update(_linear_probe_metrics(experiment, model))
    decayed = losses.variables_with_loss_weight_decay(model.trainable_variables, cfg.optim.optimizer)
    result["eval/regularization_loss"] = float(losses.weight_decay_loss(decayed, cfg.optim.weight_decay))
    result["global_step"] = int(global_step)
    logging.info("Eval at step %d: %s", global_step, result)

    summary_dir = experiment.model_dir
    if cfg.train.eval_name:
        summary_dir = os.path.join(summary_dir, f"eval_{cfg.train.eval_name}")
    writer = distribute.summary_writer(summary_dir, experiment.strategy)
    with writer.as_default():
        for name, value in result.items():
            if name != "global_step":
                tf.summary.scalar(name, value, step=global_step)
    writer.close()
    write_json(os.path.join(experiment.model_dir, "result.json"), result)
    write_json(os.path.join(experiment.model_dir, f"result_{global_step}.json"), result)
    return result


def _supervised_metrics(experiment: Experiment, model: keras.Model) -> dict[str, float]:
    strategy = experiment.strategy
    with strategy.scope():
        top_1 = keras.metrics.SparseCategoricalAccuracy(name="eval/label_top_1_accuracy")
        top_5 = keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="eval/label_top_5_accuracy")

    def replica_fn(batch):
        outputs = steps_lib.eval_step(batch, model=model)
        labels = experiment.method.eval_labels(outputs["label"])
        top_1.update_state(labels, outputs["logits"])
        top_5.update_state(labels, outputs["logits"])
        return _extra_head_hits(labels, outputs)

    run = tf.function(lambda batch: strategy.run(replica_fn, args=(batch,)), reduce_retracing=True, autograph=False)
    extra_hits: dict[str, float] = {}
    for batch in _limited(experiment.eval_dataset(experiment.config.data.eval_split), experiment):
        for name, value in run(batch).items():
            extra_hits[name] = extra_hits.get(name, 0.0) + float(strategy.reduce("SUM", value, axis=None))
    result = {top_1.name: float(top_1.result()), top_5.name: float(top_5.result())}
    count = extra_hits.pop("count", 0.0)
    # Each extra head `logits_sup_<name>` as eval/label_top_{1,5}_accuracy_<name>.
    result.update({name: hits / count for name, hits in extra_hits.items()} if count else {})
    return result


def _extra_head_hits(labels: tf.Tensor, outputs: dict) -> dict[str, tf.Tensor]:
    """Per replica: top-1/top-5 hits of each extra head's logits (as the Keras metrics count them), and "count"."""
    hits = {}
    for key, logits in outputs.items():
        if key.startswith("logits_"):
            name = key[len("logits_"):]
            top_1 = keras.metrics.sparse_categorical_accuracy(labels, logits)
            top_5 = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=5)
            hits[f"eval/label_top_1_accuracy_{name}"] = tf.reduce_sum(tf.cast(top_1, tf.float32))
            hits[f"eval/label_top_5_accuracy_{name}"] = tf.reduce_sum(tf.cast(top_5, tf.float32))
    if hits:
        hits["count"] = tf.cast(tf.shape(labels)[0], tf.float32)
    return hits


# Raw pixels are resized to at most this side before the raw-pixel k-NN: 32x32x3 =
# 3,072 values per image, so ImageNet's 50,000 queries hold 0.6 GB instead of 30 GB
# at 224x224x3. Smaller eval images are used as they are.
RAW_PIXEL_SIDE = 32
# Bank rows merged at once: 8,192 x 2,048-d float32 is 67 MB (R50), 201 MB at 6,144-d.
KNN_BANK_CHUNK = 8192


def _knn_metrics(experiment: Experiment, model: keras.Model) -> dict[str, float]:
    cfg = experiment.config
    learned, pixels = knn_evaluators(experiment, model)
    subset = knn_bank_subset(experiment)
    result: dict[str, float] = {}
    for prefix, evaluator in (("eval/knn", learned), ("eval/knn_raw_pixels", pixels)):
        scores = evaluator.scores()
        result[f"{prefix}_top_1_accuracy"] = knn.top_k_accuracy(scores, evaluator.query_labels, 1)
        result[f"{prefix}_top_5_accuracy"] = knn.top_k_accuracy(scores, evaluator.query_labels, 5)
    result["eval/knn_bank_size"] = learned.bank_size
    counts = learned.bank_class_counts
    logging.info(
        "k-NN (k=%d, T=%g): bank of %d %s examples (%s; %d-%d per class), %d queries; "
        "%d-d features, %d raw-pixel values per image; peak ~%.0f MB (queries, one bank "
        "chunk, each query's k best)",
        cfg.train.knn_k,
        cfg.train.knn_temperature,
        learned.bank_size,
        cfg.data.train_split,
        "the whole split" if subset is None
        else f"--knn_bank_size={cfg.train.knn_bank_size}: class-balanced, --seed={cfg.train.seed}",
        counts.min() if counts.size else 0,
        counts.max() if counts.size else 0,
        learned.num_queries,
        learned.dim,
        pixels.dim,
        (learned.peak_bytes() + pixels.peak_bytes()) / 1e6,
    )
    return result


def knn_bank_subset(experiment: Experiment) -> data_lib.LabeledSubset | None:
    """The class-balanced subset of the train split in the k-NN bank; None = all of it.

    Above `--knn_bank_size` examples, `knn_bank_size // num_classes` per class chosen
    with `--seed` (the few-label subsets' selection, so the same for the same seed).
    """
    cfg = experiment.config
    cap = cfg.train.knn_bank_size
    if not cap or experiment.source.num_examples(cfg.data.train_split) <= cap:
        return None
    return data_lib.LabeledSubset(per_class=cap // experiment.source.num_classes, seed=cfg.train.seed)


def knn_evaluators(experiment: Experiment, model: keras.Model) -> tuple[knn.StreamingKnn, knn.StreamingKnn]:
    """k-NN on the model's features and on raw pixels, bank and queries streamed through.

    One pass over the eval split (--eval_steps) gives the queries, one over the bank
    (`knn_bank_subset` of the train split) the neighbours; the bank is never held.
    Read each one's `scores()` and `query_labels`.
    """
    cfg = experiment.config
    strategy = experiment.strategy
    side = min(cfg.model.image_size, RAW_PIXEL_SIDE)

    def replica_fn(batch):
        outputs = steps_lib.eval_step(batch, model=model)
        images = batch["image"]  # (B, S, S, 3), the eval view in [0, 1]
        if images.shape[1] != side:
            images = tf.image.resize(images, [side, side], method="area")
        outputs["pixels"] = tf.reshape(tf.cast(images, tf.float32), [tf.shape(images)[0], -1])
        return outputs

    run = tf.function(lambda batch: strategy.run(replica_fn, args=(batch,)), reduce_retracing=True, autograph=False)
    options = {"num_classes": experiment.source.num_classes, "k": cfg.train.knn_k,
               "temperature": cfg.train.knn_temperature, "bank_chunk": KNN_BANK_CHUNK}
    learned, pixels = knn.StreamingKnn(**options), knn.StreamingKnn(**options)
    for batch in _limited(experiment.eval_dataset(cfg.data.eval_split), experiment):
        for outputs in _local(strategy, run(batch)):
            labels = outputs["label"].numpy()
            learned.add_queries(outputs["features"].numpy(), labels)
            pixels.add_queries(outputs["pixels"].numpy(), labels)
    bank = experiment.eval_dataset(cfg.data.train_split, labeled_subset=knn_bank_subset(experiment))
    for batch in bank:
        for outputs in _local(strategy, run(batch)):
            labels = outputs["label"].numpy()
            learned.add_bank(outputs["features"].numpy(), labels)
            pixels.add_bank(outputs["pixels"].numpy(), labels)
    return learned, pixels


def _linear_probe_metrics(experiment: Experiment, model: keras.Model) -> dict[str, float]:
    """Logistic regression fit on frozen train-split features, scored on the eval split."""
    cfg = experiment.config
    train, train_labels = extract_features(experiment, model, cfg.data.train_split, limit=False)
    query, query_labels = extract_features(experiment, model, cfg.data.eval_split, limit=True)
    accuracy = linear_probe.linear_probe_top_1_accuracy(
        train, train_labels, query, query_labels, num_classes=experiment.source.num_classes
    )
    return {"eval/linear_probe_top_1_accuracy": accuracy}


def extract_features(
    experiment: Experiment, model: keras.Model, split: str, *, limit: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (`final_avg_pool`) and labels of a split, all in memory.

    The k-NN eval streams instead (`knn_evaluators`); this is for notebooks and tests.
    """
    strategy = experiment.strategy
    run = tf.function(
        lambda batch: strategy.run(lambda b: steps_lib.eval_step(b, model=model), args=(batch,)),
        reduce_retracing=True,
        autograph=False,
    )
    features, labels = [], []
    batches = experiment.eval_dataset(split)
    for batch in _limited(batches, experiment) if limit else batches:
        outputs = run(batch)
        for replica_outputs in _local(strategy, outputs):
            features.append(replica_outputs["features"].numpy())
            labels.append(replica_outputs["label"].numpy())
    return np.concatenate(features), np.concatenate(labels)


def _local(strategy: tf.distribute.Strategy, outputs: dict) -> list[dict]:
    per_key = {k: strategy.experimental_local_results(v) for k, v in outputs.items()}
    return [dict(zip(per_key, values)) for values in zip(*per_key.values())]


def _limited(batches, experiment: Experiment):
    """At most --eval_steps batches (0 = the whole split)."""
    limit = experiment.config.train.eval_steps
    for index, batch in enumerate(batches):
        if limit and index >= limit:
            return
        yield batch
