"""Evaluation: supervised-head accuracy and/or weighted k-NN, written as result.json."""

from __future__ import annotations

import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

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
        top_1.update_state(outputs["label"], outputs["logits"])
        top_5.update_state(outputs["label"], outputs["logits"])

    run = tf.function(lambda batch: strategy.run(replica_fn, args=(batch,)), reduce_retracing=True)
    for batch in _limited(experiment.eval_dataset(experiment.config.data.eval_split), experiment):
        run(batch)
    return {top_1.name: float(top_1.result()), top_5.name: float(top_5.result())}


def _knn_metrics(experiment: Experiment, model: keras.Model) -> dict[str, float]:
    cfg = experiment.config
    bank, bank_labels = extract_features(experiment, model, cfg.data.train_split, limit=False)
    query, query_labels = extract_features(experiment, model, cfg.data.eval_split, limit=True)
    scores = knn.knn_class_scores(
        bank,
        bank_labels,
        query,
        num_classes=experiment.source.num_classes,
        k=cfg.train.knn_k,
        temperature=cfg.train.knn_temperature,
    )
    return {
        "eval/knn_top_1_accuracy": knn.top_k_accuracy(scores, query_labels, 1),
        "eval/knn_top_5_accuracy": knn.top_k_accuracy(scores, query_labels, 5),
    }


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
    """Backbone features (`final_avg_pool`) and labels of a split, without augmentation."""
    strategy = experiment.strategy
    run = tf.function(
        lambda batch: strategy.run(lambda b: steps_lib.eval_step(b, model=model), args=(batch,)),
        reduce_retracing=True,
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
