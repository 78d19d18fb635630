"""`--train_mode=adapt`: self-learning under distribution shift, without source data.

Rusak et al., "If your data distribution shifts, use self-learning" (TMLR 2022): a trained
classifier (`--checkpoint`) adapts to unlabeled images of a shifted target domain (the
train split of `--dataset`) by minimising, on its own predictions, either the entropy
(ENT, `--adapt_loss=entropy`, as TENT) or the generalized cross-entropy of its hard
pseudo-labels (robust pseudo-labelling, RPL, `--adapt_loss=gce`, q = `--gce_q`, the
paper's 0.8). By default only the batch-norm scales and offsets train
(`--adapt_parameters=batch_norm`; `all`: every weight); batch norm runs on the target
batches' statistics and its moving averages follow them, so evaluation sees target
statistics too. Views: the weak view of the semi-supervised methods (flip + small shift).
Reference: bethgelab/robustness `robusta/selflearning/functional.py` (gce, entropy).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.methods import base, semi

Metrics = dict[str, tf.Tensor]
ADAPT_METRICS = ("adapt_loss", "entropy", "mean_confidence")


def entropy_loss(logits: tf.Tensor) -> tf.Tensor:
    """Mean over rows of the Shannon entropy (nats) of softmax(logits); float32."""
    logits = tf.cast(logits, tf.float32)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_mean(tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1))


def gce_loss(logits: tf.Tensor, *, q: float) -> tf.Tensor:
    """Mean over rows of (1 - p_y^q) / q, y = argmax of the logits (a constant label).

    Generalized cross-entropy (Zhang & Sabuncu, 2018): q -> 0 is the cross-entropy of the
    hard pseudo-label, q = 1 the mean absolute error; in between it down-weights rows the
    model is unsure of, which makes self-labelling robust to its own errors.
    """
    if not 0 < q <= 1:
        raise ValueError(f"gce_loss: q must be in (0, 1], got {q}")
    probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    labels = tf.argmax(tf.stop_gradient(probs), axis=-1, output_type=tf.int32)
    p_label = tf.gather(probs, labels, axis=1, batch_dims=1)
    return tf.reduce_mean((1.0 - tf.pow(p_label, q)) / q)


def adapt_loss(
    logits: tf.Tensor, *, loss: str, q: float = 0.8, true_labels: tf.Tensor | None = None
) -> tuple[tf.Tensor, Metrics]:
    """The adaptation loss of target-domain logits and its metrics.

    `true_labels` (N,): only for the "pseudo_label_acc" monitoring metric, never the loss.
    """
    if loss == "entropy":
        value = entropy_loss(logits)
    elif loss == "gce":
        value = gce_loss(logits, q=q)
    else:
        raise ValueError(f"adapt_loss: loss must be 'entropy' or 'gce', got {loss!r}")
    probs = tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)), axis=-1)
    metrics = {
        "adapt_loss": value,
        "entropy": tf.stop_gradient(entropy_loss(logits)),
        "mean_confidence": tf.reduce_mean(tf.reduce_max(probs, axis=-1)),
    }
    if true_labels is not None:
        hits = tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), tf.cast(true_labels, tf.int32))
        metrics["pseudo_label_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
    return value, metrics


def is_batch_norm_affine(variable) -> bool:
    """Batch-norm scale or offset (every batch norm's name holds `batch_norm`, resnet.py)."""
    return "batch_norm" in variable.path and variable.path.rsplit("/", 1)[-1] in ("gamma", "beta")


class Adapt(base.Method):
    """Entropy minimisation or robust pseudo-labelling on unlabeled target images."""

    name = "adapt"

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        base.require_checkpoint(config, resuming=resuming, what=(
            "--train_mode=adapt adapts a trained classifier; pass the model_dir of a finetune, "
            "supervised or semi-supervised run (trained on the source domain)."))

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return ADAPT_METRICS + ("pseudo_label_acc",)

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        # Before the optimizer is built, so its slots exist for the trained variables only.
        if self.config.adapt.adapt_parameters == "batch_norm":
            for variable in model.trainable_variables:
                if not is_batch_norm_affine(variable):
                    variable.trainable = False

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        logits = model(batch["image"], training=True)["logits_sup"]
        adapt = self.config.adapt
        return adapt_loss(logits, loss=adapt.adapt_loss, q=adapt.gce_q, true_labels=batch["label"])

    def train_batches(self, batch_size, context, *, start_step, cache):
        return self.experiment.training_batches(
            batch_size, context, view_fns=(semi.view_fn(self.config, "weak"),),
            start_example=base.start_example(start_step, self.examples_per_step(self.config), context),
            cache=cache,
        )

