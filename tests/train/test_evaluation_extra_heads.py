"""Evaluation scores every extra classifier head a model returns (`logits_sup_<name>`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.train import evaluation
from simclr_tf.train import steps as steps_lib
from simclr_tf.train.experiment import Experiment


class _TwoHeads(keras.Model):
    """A linear classifier, `logits_sup_flipped` its negation, `logits_sup_rolled` its roll over classes."""

    def __init__(self):
        super().__init__(name="two_heads")
        self.supervised_head = keras.layers.Dense(10)

    def build(self, input_shape):
        self.supervised_head.build((None, int(np.prod(input_shape[1:]))))

    def call(self, images, training=False):
        features = tf.reshape(images, [tf.shape(images)[0], -1])
        logits = self.supervised_head(features)
        return {"final_avg_pool": features, "logits_sup": logits, "logits_sup_flipped": -logits,
                "logits_sup_rolled": tf.roll(logits, 1, axis=1)}


def _accuracies(labels, logits):
    top_5 = np.argsort(-logits, axis=1)[:, :5]
    return (logits.argmax(1) == labels).mean(), (top_5 == labels[:, None]).any(1).mean()


@pytest.mark.parametrize("distributed", [False, True])
def test_each_logits_sup_output_is_scored_under_its_name(tiny_method_config, tmp_path, request, distributed):
    strategy = request.getfixturevalue("two_cpu_strategy") if distributed else None
    experiment = Experiment.create(tiny_method_config("supervised"), str(tmp_path), strategy)
    with experiment.strategy.scope():
        model = _TwoHeads()
        model.build((None, 16, 16, 3))
    result = evaluation._supervised_metrics(experiment, model)

    labels, outputs = [], {}
    for batch in experiment.eval_dataset(experiment.config.data.eval_split):
        for images, batch_labels in zip(experiment.strategy.experimental_local_results(batch["image"]),
                                        experiment.strategy.experimental_local_results(batch["label"])):
            labels.append(batch_labels.numpy())
            step = steps_lib.eval_step({"image": images, "label": batch_labels}, model=model)
            for key in ("logits", "logits_flipped", "logits_rolled"):
                outputs.setdefault(key, []).append(step[key].numpy())
    labels = np.concatenate(labels)
    assert len(labels) == 16
    assert set(result) == {f"eval/label_top_{k}_accuracy{s}" for k in (1, 5) for s in ("", "_flipped", "_rolled")}
    for key, suffix in (("logits", ""), ("logits_flipped", "_flipped"), ("logits_rolled", "_rolled")):
        top_1, top_5 = _accuracies(labels, np.concatenate(outputs[key]))
        assert result[f"eval/label_top_1_accuracy{suffix}"] == pytest.approx(top_1), key
        assert result[f"eval/label_top_5_accuracy{suffix}"] == pytest.approx(top_5), key
