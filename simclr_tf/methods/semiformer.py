"""Semiformer (Weng et al., ECCV 2022): a conv branch's pseudo-labels train a coupled ViT branch.

The model is `models.semiformer.SemiformerModel`: a ResNet and a ViT coupled at each
stage by fusion modules, a head on each. A step (reference: wengzejia1/Semiformer
semi_engine_concat_evalVersion.py `train_one_epoch` with its recipes' `--pseudo-type cnn`):
  - labeled images: cross-entropy on both heads, averaged: (CE_conv + CE_transformer) / 2;
  - the weak views go through the model in inference mode (the reference's `model.eval()`
    under `no_grad`): the CONV head's softmax gives hard pseudo-labels, kept when the
    largest probability reaches --pseudo_label_threshold (>=);
  - the strong views (in the labeled images' training-mode pass) learn those pseudo-labels
    on BOTH heads, FixMatch's masked cross-entropy averaged over all rows:
    (Lu_conv + Lu_transformer) / 2. So the conv branch teaches the transformer branch (and
    itself, across views); the transformer never teaches the conv branch (the reference's
    other `--pseudo-type`s, e.g. `fuse`, are not ported).
Loss = (CE_conv + CE_transformer) / 2 + --unlabeled_loss_weight * (Lu_conv + Lu_transformer) / 2.

Defaults, the reference's ImageNet recipes (script/*.sh, README): threshold 0.7,
lambda_u 4 (`--semi-lambda 4.0`; its argparse default is 10), mu 7 (`--mu 0.125`: a
labeled eighth of each batch). The pseudo-labels and the masks are constants: no gradient
reaches the weak-view pass.

Starting points: from scratch, or from --checkpoint: a ResNet run of this repo (pretrain,
finetune, supervised) restores into the conv branch (its backbone, the projection layers
below --ft_proj_selector, its classifier); the transformer branch, the fusion modules and
the transformer head start fresh, as the restore's log lists. A ViT run's checkpoint does
not fit the conv branch: the restore stops with the mismatched variables.

Departures: no supervised-only warm-up epochs before the unlabeled term (the reference's
`--semi-start-epoch 30`; start from a supervised or fine-tuned checkpoint instead), no label
smoothing (the reference smooths the labeled CE by 0.1, and the unlabeled one with
`--unlabel-smooth`), and the shared weight average (--ema_decay, --eval_with_ema) instead
of the reference's EMA of decay 0.99996, which it does not evaluate.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.config import VIT_POOLINGS, VIT_SIZES, FlagError
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi
from simclr_tf.models import semiformer as semiformer_lib

Metrics = dict[str, tf.Tensor]

BRANCH_METRICS = (
    "supervised_loss_conv", "supervised_loss_transformer", "unlabeled_loss_conv", "unlabeled_loss_transformer",
)


def semiformer_loss(
    *,
    labeled_conv_logits: tf.Tensor,
    labeled_transformer_logits: tf.Tensor,
    labels: tf.Tensor,
    weak_conv_logits: tf.Tensor,
    strong_conv_logits: tf.Tensor,
    strong_transformer_logits: tf.Tensor,
    threshold: float = 0.7,
    unlabeled_weight: float = 4.0,
    unlabeled_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, Metrics]:
    """`(CE_c + CE_t) / 2 + unlabeled_weight * (Lu_c + Lu_t) / 2`, Lu the conv branch's pseudo-labels' loss.

    Args:
      labeled_conv_logits, labeled_transformer_logits: (B, C) each head on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      weak_conv_logits: (U, C) the conv head on the weak views: the pseudo-labels' only
        source, a constant (no gradient flows into it).
      strong_conv_logits, strong_transformer_logits: (U, C) each head on the strong views.
      threshold: keep a pseudo-label when max softmax(weak_conv_logits) >= threshold.
      unlabeled_weight: lambda_u.
      unlabeled_labels: (U,) true labels, only for "pseudo_label_acc".

    Returns:
      `(loss, metrics)`: "supervised_loss" and "unlabeled_loss" are the two heads' means
      (the latter before its weight; each head's averaged over all U rows, masked ones
      included), "supervised_acc" that of the fused logits (their mean), plus each head's
      terms (`BRANCH_METRICS`) and the pseudo-labels' "mask_rate" and "pseudo_label_acc".
    """
    sup_conv, _ = losses.supervised_loss(labels=labels, logits=labeled_conv_logits)
    sup_transformer, _ = losses.supervised_loss(labels=labels, logits=labeled_transformer_logits)
    fused = (tf.cast(labeled_conv_logits, tf.float32) + tf.cast(labeled_transformer_logits, tf.float32)) / 2
    _, metrics = losses.supervised_loss(labels=labels, logits=fused)
    targets, mask, _ = common.pseudo_labels(weak_conv_logits, threshold=threshold)
    unsup_conv = common.masked_cross_entropy(logits=strong_conv_logits, targets=targets, mask=mask)
    unsup_transformer = common.masked_cross_entropy(logits=strong_transformer_logits, targets=targets, mask=mask)
    sup_loss = (sup_conv + sup_transformer) / 2
    unsup_loss = (unsup_conv + unsup_transformer) / 2
    metrics.update(
        supervised_loss=sup_loss,
        unlabeled_loss=unsup_loss,
        supervised_loss_conv=sup_conv,
        supervised_loss_transformer=sup_transformer,
        unlabeled_loss_conv=unsup_conv,
        unlabeled_loss_transformer=unsup_transformer,
    )
    metrics.update(common.pseudo_label_metrics(targets, mask, unlabeled_labels))
    return sup_loss + unlabeled_weight * unsup_loss, metrics


class Semiformer(semi.SemiSupervised):
    """`--train_mode=semiformer`: the conv head's weak-view pseudo-labels train both heads' strong views."""

    name = "semiformer"
    unlabeled_views = ("weak", "strong")
    # wengzejia1/Semiformer script/submitit_Semiformer_1:7_600Ech_8gpus.sh.
    defaults = {"unlabeled_batch_ratio": 7, "pseudo_label_threshold": 0.7, "unlabeled_loss_weight": 4.0}

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        super().check_flags(config, resuming=resuming)
        m = config.model
        if m.backbone != "resnet":
            raise FlagError(
                f"--backbone={m.backbone}: --train_mode=semiformer has both a ResNet (--resnet_depth, "
                "--width_multiplier) and a ViT (--vit_size, --patch_size, --vit_pooling) branch; leave "
                "--backbone at resnet."
            )
        if m.vit_size not in VIT_SIZES:
            raise FlagError(f"--vit_size: {m.vit_size!r} is not one of {VIT_SIZES}.")
        if m.vit_pooling not in VIT_POOLINGS:
            raise FlagError(f"--vit_pooling: {m.vit_pooling!r} is not one of {VIT_POOLINGS}.")
        problem = semiformer_lib.fusion_problem(m.image_size, m.patch_size, m.cifar_stem)
        if problem:
            raise FlagError(f"--patch_size: {problem}")
        for flag, allowed in (("fine_tune_after_block", -1), ("dropout_rate", 0.0)):
            if getattr(m, flag) != allowed:
                raise FlagError(f"--{flag}: --train_mode=semiformer does not support it; leave it at {allowed}.")

    def build_model(self) -> keras.Model:
        experiment = self.experiment
        return semiformer_lib.build_semiformer(
            self.config.model,
            num_classes=experiment.source.num_classes,
            # Synchronising a single replica's statistics only costs time (as Experiment.build).
            global_bn=self.config.model.global_bn and experiment.strategy.num_replicas_in_sync > 1,
            dtype=self.config.runtime.precision,
        )

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + semi.PSEUDO_LABEL_METRICS + BRANCH_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        weak, strong = self.split_unlabeled(batch)  # (U, S, S, 3) each
        # The teacher pass: the model itself in inference mode, as the reference's
        # `model.eval()` + `no_grad` (BN statistics untouched, no stochastic depth).
        weak_conv_logits = tf.stop_gradient(model(weak, training=False)["logits_sup_conv"])  # (U, C)
        labeled = batch["image"]  # (B, S, S, 3)
        outputs = model(tf.concat([labeled, strong], axis=0), training=True)  # one pass, as the reference
        sizes = [tf.shape(labeled)[0], tf.shape(strong)[0]]
        labeled_conv, strong_conv = tf.split(outputs["logits_sup_conv"], sizes, axis=0)
        labeled_transformer, strong_transformer = tf.split(outputs["logits_sup_transformer"], sizes, axis=0)
        loss, metrics = semiformer_loss(
            labeled_conv_logits=labeled_conv,
            labeled_transformer_logits=labeled_transformer,
            labels=batch["label"],
            weak_conv_logits=weak_conv_logits,
            strong_conv_logits=strong_conv,
            strong_transformer_logits=strong_transformer,
            threshold=self.pseudo_label_threshold,
            unlabeled_weight=self.unlabeled_loss_weight,
            unlabeled_labels=batch["unlabeled_label"],
        )
        return loss, self.with_class_fractions(metrics, weak_conv_logits)
