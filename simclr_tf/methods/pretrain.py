"""`--train_mode=pretrain`: SimCLR contrastive learning (NT-Xent over two views)."""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base

CONTRASTIVE_METRICS = ("contrast_loss", "contrast_acc", "contrast_entropy")


class Pretrain(base.Method):
    """NT-Xent on the projections, plus linear eval on the (stop-gradient) features."""

    name = "pretrain"

    def build_model(self) -> keras.Model:
        with_head = self.config.train.lineareval_while_pretraining
        return self.experiment.build(
            self.config.model,
            num_classes=self.experiment.source.num_classes if with_head else None,
            # Linear eval while pretraining must not shape the representation.
            stop_gradient_to_supervised_head=True,
            drop_unused_projection_layers=False,
        )

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        has_head = getattr(model, "supervised_head", None) is not None
        return CONTRASTIVE_METRICS + (base.SUPERVISED_METRICS if has_head else ())

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        outputs = model(batch["image"], training=True)  # image: (2B, H, W, 3), view-major
        loss, metrics = losses.nt_xent_loss(
            projections=outputs["proj_head_output"],
            temperature=self.config.train.temperature,
            hidden_norm=self.config.train.hidden_norm,
            replica_context=base.replica_context_if_distributed(),
        )
        if "logits_sup" in outputs:
            # Both views carry the example's label.
            labels = tf.concat([batch["label"], batch["label"]], axis=0)
            sup_loss, sup_metrics = losses.supervised_loss(labels=labels, logits=outputs["logits_sup"])
            loss += sup_loss
            metrics.update(sup_metrics)
        return loss, metrics

    def train_batches(self, batch_size, context, *, start_step, cache):
        d = self.config.data
        return self.experiment.training_batches(
            batch_size, context, num_views=2,
            color_jitter_strength=d.color_jitter_strength, use_blur=d.use_blur,
            start_example=base.start_example(start_step, self.examples_per_step(self.config), context), cache=cache,
        )
