"""`--train_mode=pu`: positive-unlabeled binary classification with the non-negative risk.

Kiryo et al., "Positive-Unlabeled Learning with Non-Negative Risk Estimator" (NeurIPS
2017). Labeled images exist for the positive classes only (`--positive_classes`, the
`--labeled_fraction` / `--labeled_per_class` subset of them); the unlabeled images (the
whole train split) hold positives at a known rate pi (`--pu_prior`). With a surrogate
loss l of a score g(x) (`--pu_surrogate`: sigmoid(-z), the paper's, or softplus(-z)):
  R = pi E_P[l(g)] + max(-beta, E_U[l(-g)] - pi E_P[l(-g)]),
and when the negative part falls below -beta its gradient is reversed and scaled by gamma
(`--nnpu_beta`, `--nnpu_gamma`), as the reference code kiryor/nnPUlearning `pu_loss.py`.
`--pu_loss=unlabeled_as_negative` is the biased baseline: pi E_P[l(g)] + (1 - pi) E_U[l(-g)].
The model's classifier has two logits (negative, positive), g = logit_1 - logit_0;
evaluation maps labels to 1 for the positive classes and 0 for the rest, so
`eval/label_top_1_accuracy` is the binary accuracy. `--pu_split=easy_hard` continues from
a trained nnPU run (`--pu_base_checkpoint`) with Split-PU's easy/hard split of the unlabeled
images and its losses: `split_pu.py`, whose stages are subclasses of `Pu` that `Pu` picks
itself (the registry has one class per train mode).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import data as data_lib
from simclr_tf.config import FlagError
from simclr_tf.methods import base, semi

Metrics = dict[str, tf.Tensor]
PU_METRICS = ("pu_risk", "positive_risk", "negative_risk")


# l(z): the loss of score z for the label +1 (l(-z) for -1), as the reference's --loss.
SURROGATES = {
    "sigmoid": lambda z: tf.sigmoid(-z),
    # Unbounded, so a wrongly scored example keeps a gradient (sigmoid's vanishes).
    "logistic": lambda z: tf.nn.softplus(-z),
}


def pu_loss(
    *,
    positive_scores: tf.Tensor,
    unlabeled_scores: tf.Tensor,
    prior: float,
    loss: str = "nnpu",
    surrogate: str = "sigmoid",
    beta: float = 0.0,
    gamma: float = 1.0,
) -> tuple[tf.Tensor, Metrics]:
    """The loss to minimise and its metrics; "pu_risk" is the risk estimate itself.

    Args:
      positive_scores: (P,) scores g(x) of labeled positives.
      unlabeled_scores: (U,) scores of unlabeled images.
      prior: pi, the positives' rate among the unlabeled images.
      loss: "nnpu" or "unlabeled_as_negative".
      surrogate: l, "sigmoid" (the paper's) or "logistic".
    """
    ell = SURROGATES[surrogate]
    positive_scores = tf.cast(positive_scores, tf.float32)
    unlabeled_scores = tf.cast(unlabeled_scores, tf.float32)
    positive_risk = prior * tf.reduce_mean(ell(positive_scores))
    if loss == "unlabeled_as_negative":
        negative_risk = (1.0 - prior) * tf.reduce_mean(ell(-unlabeled_scores))
        risk = positive_risk + negative_risk
        return risk, {"pu_risk": risk, "positive_risk": positive_risk, "negative_risk": negative_risk}
    if loss != "nnpu":
        raise ValueError(f"pu_loss: loss must be 'nnpu' or 'unlabeled_as_negative', got {loss!r}")
    negative_risk = tf.reduce_mean(ell(-unlabeled_scores)) - prior * tf.reduce_mean(ell(-positive_scores))
    overfitting = negative_risk < -beta
    risk = tf.where(overfitting, positive_risk - beta, positive_risk + negative_risk)
    # Below -beta, descend on -gamma * negative_risk: push the negative risk back up.
    minimised = tf.where(overfitting, -gamma * negative_risk, positive_risk + negative_risk)
    return minimised, {"pu_risk": risk, "positive_risk": positive_risk, "negative_risk": negative_risk}


def binary_scores(logits: tf.Tensor) -> tf.Tensor:
    """g(x) = logit_positive - logit_negative of the two-logit classifier."""
    logits = tf.cast(logits, tf.float32)
    return logits[:, 1] - logits[:, 0]


def positive_class_ids(text: str, class_names: list[str]) -> tuple[int, ...]:
    """--positive_classes as sorted class ids; entries are ids or class names."""
    ids = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if entry in class_names:
            ids.append(class_names.index(entry))
        elif entry.isdigit() and int(entry) < len(class_names):
            ids.append(int(entry))
        else:
            raise FlagError(f"--positive_classes: {entry!r} is neither a class name nor an id of {class_names}.")
    if not ids or len(set(ids)) == len(class_names):
        raise FlagError("--positive_classes: name at least one class and leave at least one negative.")
    return tuple(sorted(set(ids)))


class Pu(base.Method):
    """Labeled positives (weak view) and unlabeled images (weak view), B of each a step."""

    name = "pu"
    epochs_over_labeled_subset = False

    def __new__(cls, experiment, *args, **kwargs):
        """With --pu_split=easy_hard, the Split-PU stage the config asks for (`split_pu.stage_class`)."""
        if cls is Pu and experiment.config.pu.pu_split == "easy_hard":
            from simclr_tf.methods import split_pu  # it imports this module

            cls = split_pu.stage_class(experiment.config)
        return super().__new__(cls)

    @classmethod
    def run(cls, config, model_dir: str, strategy: tf.distribute.Strategy | None = None) -> dict | None:
        """One run; with --pu_split=easy_hard, Split-PU's stages (`--mode=eval`: model_dir as given)."""
        if config.pu.pu_split == "easy_hard" and config.train.mode != "eval":
            from simclr_tf.methods import split_pu  # it imports this module

            return split_pu.run(config, model_dir, strategy)
        return super().run(config, model_dir, strategy)

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        if config.pu.pu_split == "easy_hard" and config.train.mode != "eval":
            from simclr_tf.methods import split_pu  # it imports this module

            split_pu.check_base(config)

    def __init__(self, experiment):
        super().__init__(experiment)
        self.positives = positive_class_ids(self.config.pu.positive_classes, experiment.source.class_names)

    @classmethod
    def images_per_step(cls, config) -> int:
        return 2 * config.train.train_batch_size

    def build_model(self) -> keras.Model:
        return self.experiment.build(
            self.config.model, num_classes=2, stop_gradient_to_supervised_head=False,
            drop_unused_projection_layers=True,
        )

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return PU_METRICS + ("unlabeled_acc",)

    def eval_labels(self, labels: tf.Tensor) -> tf.Tensor:
        """1 for the positive classes, 0 for the others."""
        is_positive = tf.reduce_any(tf.equal(tf.cast(labels, tf.int32)[:, None], tf.constant(self.positives)[None, :]), axis=1)
        return tf.cast(is_positive, tf.int32)

    def labeled_subset(self) -> data_lib.LabeledSubset:
        subset = super().labeled_subset()
        return data_lib.LabeledSubset(subset.fraction, subset.per_class, subset.seed, classes=self.positives)

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        images = tf.concat([batch["image"], batch["unlabeled_image"]], axis=0)
        scores = binary_scores(model(images, training=True)["logits_sup"])
        positive, unlabeled = tf.split(scores, [tf.shape(batch["image"])[0], -1])
        pu = self.config.pu
        loss, metrics = pu_loss(positive_scores=positive, unlabeled_scores=unlabeled, prior=pu.pu_prior,
                                loss=pu.pu_loss, surrogate=pu.pu_surrogate, beta=pu.nnpu_beta, gamma=pu.nnpu_gamma)
        # Monitoring only: binary accuracy on the unlabeled images against their hidden labels.
        hits = tf.equal(tf.cast(unlabeled > 0, tf.int32), self.eval_labels(batch["unlabeled_label"]))
        metrics["unlabeled_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
        return loss, metrics

    def train_batches(self, batch_size, context, *, start_step, cache):
        weak = (semi.view_fn(self.config, "weak"),)
        first = base.start_example(start_step, self.config.train.train_batch_size, context)
        positives = self.experiment.training_batches(
            batch_size, context, view_fns=weak, subset=self.labeled_subset(), start_example=first, cache=cache)
        unlabeled = self.experiment.training_batches(
            batch_size, context, view_fns=weak, start_example=first, cache=cache)
        return tf.data.Dataset.zip(positives, unlabeled).map(tf.autograph.experimental.do_not_convert(
            lambda p, u: {**p, "unlabeled_image": u["image"], "unlabeled_label": u["label"]}
        ))

