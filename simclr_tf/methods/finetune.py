"""`--train_mode=finetune` (from --checkpoint) and `supervised` (from scratch): labels only."""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base


class Finetune(base.Method):
    """Cross-entropy on the labeled subset; crop and flip only, as the paper."""

    name = "finetune"
    epochs_over_labeled_subset = True

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        base.require_checkpoint(config, resuming=resuming, what=(
            "--train_mode=finetune needs --checkpoint (a pretraining model_dir or checkpoint) when "
            "--model_dir holds no checkpoint; use --train_mode=supervised to train from scratch."))

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        outputs = model(batch["image"], training=True)
        return losses.supervised_loss(labels=batch["label"], logits=outputs["logits_sup"])

    def train_batches(self, batch_size, context, *, start_step, cache):
        return self.experiment.training_batches(
            batch_size, context, subset=self.labeled_subset(),
            start_example=base.start_example(start_step, self.examples_per_step(self.config), context), cache=cache,
        )


class Supervised(Finetune):
    """The baseline SimCLRv2 compares with: the same, from scratch."""

    name = "supervised"

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        pass
