"""Split-PU (Xu et al., ACM MM 2022): `--train_mode=pu --pu_split=easy_hard`.

An nnPU classifier, the base (`--pu_base_checkpoint`, a `--train_mode=pu` run), divides the
unlabeled images (the whole `--train_split`) into easy and hard ones; a new model then
trains on each part with its own loss. `Pu.run` hands the run to `run` here, in stages:

1. split, in `<model_dir>/split/epoch_<e>/`: a temporary model learns the base's 0/1
   predictions (BCE of its score) on labeled positives and unlabeled images, one epoch a
   run. After epoch e it predicts every unlabeled image (eval view, file order); e's scores
   go to `epoch_<e>/temporary_scores.npz`, and the split stops once the temporary model
   agrees with the base on more than `--pu_split_agreement` of them (or after
   `--pu_split_max_epochs`). Images they disagree on are hard, the others easy; of the
   hard ones, those whose base score is below the 15% or above the 85% quantile of the
   hard images' base scores go back to easy (`split_easy_hard`). The split is written
   once, atomically, to `<model_dir>/pu_split.npz` (`Split`), which a rerun reads again;
   `--pu_split_file` trains on a split saved before instead.
2. final, in `<model_dir>/final/`: a new model (from `--checkpoint`, as the base) trains
   with, per step, B labeled positives (weak view), B unlabeled images shared between the
   easy and the hard part in proportion to their sizes (`unlabeled_batch_sizes`):
   - labeled positives: BCE with label 1; easy images (weak view): the generalized
     Jensen-Shannon loss (Englesson & Azizpour, NeurIPS 2021) towards the base's
     probability [1 - p, p] (measured on the un-augmented image, during the split),
     target weight 0.7; their means weighted by the two sets' sizes (`easy_loss`), the
     reference's per-epoch sum over all of them divided by their count;
   - hard images, a weak and a strong view (`--pu_hard_weight`, `--pu_sim_weight`,
     `--pu_feature_weight`): the model's own weak-view probability, where confident, is
     the BCE target of its strong view (`prediction_consistency_loss`); SimSiam's
     negative cosine between one view's predictor output and the other's features
     (`simsiam_loss`); the squared difference of the model's `block_group1` output and the
     base's on the same views (`feature_consistency_loss`).
   The result goes to `<model_dir>/split_pu.json` (a rerun with it skips everything).

Reference: the authors' code (splitpu_utils.py). Deviations, each for a reason:
- Every run of ours starts from `--checkpoint` (the temporary model too; the reference's
  starts from scratch), and each split epoch is a run of its own, continuing the previous
  epoch's weights through `--checkpoint` with a fresh optimizer and a full cosine schedule
  (restarts): the shared trainer trains to a fixed step, so an early stop is a new run.
- The reference feeds its step every easy and hard image once an epoch (batch sizes from
  the set sizes, so a step holds positives and easy images in the sets' proportion); here
  B positives and B unlabeled images a step, as `--train_mode=pu`, the unlabeled ones split
  between easy and hard in proportion, and the run's length is `--train_steps`/
  `--train_epochs`. B positives would make them half of the easy loss's examples (with 450
  positives and 44,000 easy images: 1% in the reference), which pushed the model towards
  "positive" (85.5% binary top-1 against the base's 95.5% in the automobile recipe), so
  `easy_loss` weighs the two means by the set sizes instead.
- Prediction self-consistency keeps examples whose weak-view probability p has
  max(p, 1 - p) >= 0.95, confident either way (the reference: p >= 0.95, positives only),
  and averages over all hard images (masked ones count 0), as FixMatch.
- SimSiam's features are the classifier's input (`supervised_head_input`); its predictor is
  a two-layer bottleneck MLP outside the model (checkpointed as `simsiam_predictor`).
- Low-level features: the ResNet's `block_group1` output, not `initial_conv`: both keep
  the full resolution, but `initial_conv` is taken before its batch norm, so its scale
  follows the first kernel's norm (which weight decay shrinks), while `block_group1` comes
  out of batch norm and ReLU, so the squared difference keeps about the same scale as the
  weights change. With `--pu_feature_weight` > 0 the base needs the student's backbone
  (checked against its config.json); at 0 the term, and the base's pass over the hard
  images, are left out.
- The strong view is RandAugment + Cutout (`--train_mode=fixmatch`'s), not colour jitter.
- One final model, not the reference's two rounds (its second round's weights are 0.01/0/0).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf.config import FlagError
from simclr_tf.methods import base, semi
from simclr_tf.methods.noisy_student import PseudoLabeledSource, read_json
from simclr_tf.methods.pu import Pu, binary_scores, positive_class_ids
from simclr_tf.train import checkpoints

SPLIT_FILE = "pu_split.npz"
RESULT_FILE = "split_pu.json"
SPLIT_DIR, FINAL_DIR = "split", "final"
EPOCH_SCORES_FILE = "temporary_scores.npz"
# The reference's constants: the generalized JS loss's weight on the target, the quantiles
# that send hard images back to easy, and the confidence of self-consistency's targets.
JS_TARGET_WEIGHT = 0.7
HARD_QUANTILE = 0.15
CONSISTENCY_THRESHOLD = 0.95
LOW_LEVEL_FEATURES = "block_group1"

IMITATION_METRICS = ("imitation_loss", "base_agreement")
FINAL_METRICS = ("easy_loss", "hard_loss", "sim_loss", "feature_loss", "mask_rate")


# --------------------------------------------------------------------------- losses


def imitation_loss(*, scores: tf.Tensor, base_scores: tf.Tensor) -> tuple[tf.Tensor, base.Metrics]:
    """Mean BCE of `scores` (N,) against the base's 0/1 predictions `base_scores > 0` (N,)."""
    scores = tf.cast(scores, tf.float32)
    targets = tf.cast(tf.cast(base_scores, tf.float32) > 0, tf.float32)  # a constant: no gradient
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=scores))
    agreement = tf.reduce_mean(tf.cast(tf.equal(tf.cast(scores > 0, tf.float32), targets), tf.float32))
    return loss, {"imitation_loss": loss, "base_agreement": agreement}


def generalized_js_loss(*, targets: tf.Tensor, logits: tf.Tensor, target_weight: float) -> tf.Tensor:
    """Per-example generalized Jensen-Shannon divergence, (N,), Englesson & Azizpour (2021).

    With target distribution t (N, C), prediction p = softmax(logits) (N, C), pi = target_weight
    and m = pi t + (1 - pi) p: [pi KL(t || m) + (1 - pi) KL(p || m)] / Z, Z = -(1 - pi) log(1 - pi),
    which makes it tend to the cross-entropy as pi -> 1. `targets` are constants.
    """
    targets = tf.stop_gradient(tf.cast(targets, tf.float32))
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)  # (N, C)
    p = tf.exp(log_p)
    m = target_weight * targets + (1.0 - target_weight) * p
    log_m = tf.math.log(tf.maximum(m, 1e-30))  # m is 0 only where t and p both are
    kl_target = tf.reduce_sum(tf.math.xlogy(targets, targets) - targets * log_m, axis=-1)
    kl_prediction = tf.reduce_sum(p * (log_p - log_m), axis=-1)
    scale = -(1.0 - target_weight) * math.log(1.0 - target_weight)
    return (target_weight * kl_target + (1.0 - target_weight) * kl_prediction) / scale


def easy_loss(
    *,
    positive_scores: tf.Tensor,
    easy_scores: tf.Tensor,
    easy_targets: tf.Tensor,
    target_weight: float,
    positive_ratio: float | None = None,
) -> tuple[tf.Tensor, base.Metrics]:
    """(r mean BCE(1, positives) + mean GJS([1 - t, t], easy)) / (1 + r).

    r = `positive_ratio`, the labeled positives' count over the easy images' in the whole
    training set: the reference's per-epoch [sum over all positives + sum over all easy
    images] / their count, whatever a batch's mix. None: r = P / E of this batch, i.e.
    [sum BCE + sum GJS] / (P + E), the reference's normalisation of a single batch.

    Args:
      positive_scores: (P,) scores g of labeled positives.
      easy_scores: (E,) scores of easy unlabeled images.
      easy_targets: (E,) the base's probabilities sigmoid(g_base) of those images.
    """
    positive_scores = tf.cast(positive_scores, tf.float32)
    easy_scores = tf.cast(easy_scores, tf.float32)
    easy_targets = tf.cast(easy_targets, tf.float32)
    positive_bce = tf.nn.softplus(-positive_scores)  # BCE of sigmoid(g) against label 1
    # softmax([0, g]) = [1 - sigmoid(g), sigmoid(g)]: the two-class form of a score.
    two_class = lambda x, first: tf.stack([first, x], axis=-1)  # noqa: E731
    js = generalized_js_loss(
        targets=two_class(easy_targets, 1.0 - easy_targets),
        logits=two_class(easy_scores, tf.zeros_like(easy_scores)),
        target_weight=target_weight,
    )
    if positive_ratio is None:
        count = tf.cast(tf.size(positive_bce) + tf.size(js), tf.float32)
        loss = (tf.reduce_sum(positive_bce) + tf.reduce_sum(js)) / tf.maximum(count, 1.0)
    else:
        loss = (positive_ratio * tf.reduce_mean(positive_bce) + tf.reduce_mean(js)) / (1.0 + positive_ratio)
    return loss, {"easy_loss": loss}


def prediction_consistency_loss(
    *, weak_scores: tf.Tensor, strong_scores: tf.Tensor, threshold: float
) -> tuple[tf.Tensor, base.Metrics]:
    """Mean over the N hard images of mask * BCE(p, strong), p = sigmoid(weak score), a constant.

    mask: max(p, 1 - p) >= threshold (confident either way; the reference keeps p >= threshold
    only). Masked-out images count 0 in the mean. "mask_rate" is the kept fraction.
    """
    targets = tf.stop_gradient(tf.sigmoid(tf.cast(weak_scores, tf.float32)))  # (N,)
    mask = tf.cast(tf.maximum(targets, 1.0 - targets) >= threshold, tf.float32)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=tf.cast(strong_scores, tf.float32))
    loss = tf.reduce_mean(mask * bce)
    return loss, {"hard_loss": loss, "mask_rate": tf.reduce_mean(mask)}


def simsiam_loss(
    *, weak_predictions: tf.Tensor, strong_predictions: tf.Tensor, weak_features: tf.Tensor, strong_features: tf.Tensor
) -> tf.Tensor:
    """SimSiam (Chen & He, CVPR 2021): D(p_weak, z_strong) / 2 + D(p_strong, z_weak) / 2.

    D(p, z) = -mean_i cos(p_i, stop_gradient(z_i)); predictions p (N, D) are the predictor's
    outputs, features z (N, D) its inputs. In [-1, 1].
    """

    def negative_cosine(p, z):
        p = tf.math.l2_normalize(tf.cast(p, tf.float32), axis=-1)
        z = tf.math.l2_normalize(tf.stop_gradient(tf.cast(z, tf.float32)), axis=-1)
        return -tf.reduce_mean(tf.reduce_sum(p * z, axis=-1))

    return (0.5 * negative_cosine(weak_predictions, strong_features)
            + 0.5 * negative_cosine(strong_predictions, weak_features))


def feature_consistency_loss(*, features: tf.Tensor, base_features: tf.Tensor) -> tf.Tensor:
    """Mean squared difference of feature maps (N, h, w, C); the base's are constants."""
    difference = tf.cast(features, tf.float32) - tf.stop_gradient(tf.cast(base_features, tf.float32))
    return tf.reduce_mean(tf.square(difference))


def split_pu_loss(
    *,
    positive_scores: tf.Tensor,
    easy_scores: tf.Tensor,
    easy_targets: tf.Tensor,
    hard: dict[str, tf.Tensor] | None,
    hard_weight: float,
    sim_weight: float,
    feature_weight: float,
    target_weight: float,
    threshold: float,
    positive_ratio: float | None = None,
) -> tuple[tf.Tensor, base.Metrics]:
    """easy + hard_weight * self-consistency + sim_weight * SimSiam + feature_weight * cross-consistency.

    `hard`: the hard images' tensors, or None when the split has none (the hard terms are 0):
    "weak_scores", "strong_scores" (N,); "weak_predictions", "strong_predictions",
    "weak_features", "strong_features" (N, D); "low_level", "base_low_level" (2N, h, w, C),
    left out when feature_weight is 0 (the term is then 0).
    """
    loss, metrics = easy_loss(positive_scores=positive_scores, easy_scores=easy_scores,
                              easy_targets=easy_targets, target_weight=target_weight,
                              positive_ratio=positive_ratio)
    zero = tf.constant(0.0)
    metrics.update(hard_loss=zero, mask_rate=zero, sim_loss=zero, feature_loss=zero)
    if hard is None:
        return loss, metrics
    consistency, consistency_metrics = prediction_consistency_loss(
        weak_scores=hard["weak_scores"], strong_scores=hard["strong_scores"], threshold=threshold)
    metrics.update(consistency_metrics)
    metrics["sim_loss"] = simsiam_loss(
        weak_predictions=hard["weak_predictions"], strong_predictions=hard["strong_predictions"],
        weak_features=hard["weak_features"], strong_features=hard["strong_features"])
    if "low_level" in hard:
        metrics["feature_loss"] = feature_consistency_loss(features=hard["low_level"],
                                                           base_features=hard["base_low_level"])
    loss += hard_weight * consistency + sim_weight * metrics["sim_loss"] + feature_weight * metrics["feature_loss"]
    return loss, metrics


# --------------------------------------------------------------------------- the split


def split_easy_hard(
    base_scores: np.ndarray, temporary_scores: np.ndarray, *, quantile: float = HARD_QUANTILE
) -> np.ndarray:
    """(N,) bool, True for easy: the two models' 0/1 predictions agree, or the base is sure.

    Images the two disagree on are hard, except those whose base score lies outside
    [q, 1 - q] quantiles (linear interpolation, as torch.quantile) of the hard images' base
    scores: the base's most confident of them go back to easy.
    """
    base_scores = np.asarray(base_scores, np.float64)
    disagree = (base_scores > 0) != (np.asarray(temporary_scores) > 0)
    if not disagree.any():
        return np.ones(len(base_scores), bool)
    low, high = np.quantile(base_scores[disagree], [quantile, 1.0 - quantile])
    hard = disagree & (base_scores >= low) & (base_scores <= high)
    return ~hard


@dataclasses.dataclass(frozen=True)
class Split:
    """The split of the unlabeled images as `pu_split.npz` holds it, index i = the split's i-th."""

    easy: np.ndarray  # (N,) bool
    base_scores: np.ndarray  # (N,) float32, the base's g on the eval view
    temporary_scores: np.ndarray  # (N,) float32, the temporary model's at the last epoch
    labels: np.ndarray  # (N,) int64 class ids: monitoring only
    epochs: int  # the temporary model's epochs
    agreement: float  # its agreement with the base after them

    @property
    def num_examples(self) -> int:
        return len(self.easy)

    def stats(self, positives: tuple[int, ...]) -> dict:
        """Counts, and the fraction of true positives in each part (monitoring: the loss never reads it)."""
        is_positive = np.isin(self.labels, positives)
        disagree = (self.base_scores > 0) != (self.temporary_scores > 0)

        def positive_fraction(mask):
            return float(is_positive[mask].mean()) if mask.any() else 0.0

        return {
            "examples": self.num_examples, "epochs": self.epochs, "agreement": self.agreement,
            "disagreeing": int(disagree.sum()), "easy": int(self.easy.sum()), "hard": int((~self.easy).sum()),
            "moved_back_to_easy": int((disagree & self.easy).sum()),
            "easy_positive_fraction": positive_fraction(self.easy),
            "hard_positive_fraction": positive_fraction(~self.easy),
        }

    def save(self, path: str) -> None:
        """Writes atomically (a temporary file, then a rename): a kill leaves no partial file."""
        _save_npz(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> "Split":
        arrays = _load_npz(path)
        return cls(
            easy=arrays["easy"].astype(bool), base_scores=arrays["base_scores"],
            temporary_scores=arrays["temporary_scores"], labels=arrays["labels"],
            epochs=int(arrays["epochs"]), agreement=float(arrays["agreement"]),
        )


def _save_npz(path: str, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with tf.io.gfile.GFile(path, "rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        return {name: arrays[name] for name in arrays.files}


def unlabeled_batch_sizes(batch_size: int, num_easy: int, num_hard: int) -> tuple[int, int]:
    """(easy, hard) images of a step's `batch_size` unlabeled ones, in proportion to the parts.

    A part with images gets at least one (so the easy part can get B - 1 <= its share).
    """
    if num_hard == 0:
        return batch_size, 0
    if num_easy == 0:
        return 0, batch_size
    hard = min(batch_size - 1, max(1, round(batch_size * num_hard / (num_easy + num_hard))))
    return batch_size - hard, hard


# --------------------------------------------------------------------------- models


def base_model_config(config) -> config_lib.ModelConfig:
    """The base's architecture: its run's config.json (as a teacher's), else this run's."""
    from simclr_tf.train.experiment import TEACHER_FIELDS, read_saved_model_config  # it imports us

    saved = read_saved_model_config(config.pu.pu_base_checkpoint)
    return dataclasses.replace(config.model, **{f: saved[f] for f in TEACHER_FIELDS if f in saved},
                               fine_tune_after_block=-1)


def check_base(config) -> str:
    """The base's checkpoint path; FlagError naming --pu_base_checkpoint if it cannot be the base."""
    from simclr_tf.train.experiment import read_saved_config  # it imports us

    given = config.pu.pu_base_checkpoint
    try:
        path = checkpoints.resolve_checkpoint_path(given or "", flag="pu_base_checkpoint")
    except (ValueError, FileNotFoundError) as error:
        raise FlagError(str(error)) from None
    saved = read_saved_config(given)
    mode = saved.get("train", {}).get("train_mode")
    if mode not in (None, "pu"):
        raise FlagError(f"--pu_base_checkpoint={given} is a --train_mode={mode} run; the base is an nnPU "
                        "classifier, a --train_mode=pu run.")
    if config.pu.pu_feature_weight > 0:
        theirs = saved.get("model", {})
        fields = ("resnet_depth", "width_multiplier", "image_size")
        differences = [f"--{f}={theirs[f]} there, {getattr(config.model, f)} here" for f in fields
                       if f in theirs and theirs[f] != getattr(config.model, f)]
        if differences:
            raise FlagError(
                f"--pu_base_checkpoint={given}: its model differs from this run's ({'; '.join(differences)}), "
                f"and --pu_feature_weight compares the two models' {LOW_LEVEL_FEATURES} outputs. Use the "
                "base's flags, or --pu_feature_weight=0."
            )
    return path


def restore_classifier(experiment, model_config: config_lib.ModelConfig, path: str) -> keras.Model:
    """A frozen two-logit classifier with every variable from checkpoint `path`; under the strategy scope."""
    model = experiment.build(model_config, num_classes=2, stop_gradient_to_supervised_head=False,
                             drop_unused_projection_layers=True)
    checkpoints.restore_model_weights(model, path, exact=False, required_prefixes=(f"{checkpoints.MODEL_ROOT}/",))
    model.trainable = False
    return model


def score_function(experiment, model: keras.Model) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """`() -> (scores g (N,), class ids (N,))` of every image of --train_split, eval view, file order.

    Traced once: the split's epochs restore their weights into the same model and call it again.
    """
    config = experiment.config
    dataset = data_lib.build_dataset(
        experiment.source, split=config.data.train_split, batch_size=config.train.eval_batch_size,
        is_training=False, num_views=1, image_size=config.model.image_size, color_jitter_strength=0.0,
        use_blur=False,
    )
    predict = tf.function(lambda images: binary_scores(model(images, training=False)["logits_sup"]),
                          reduce_retracing=True)

    def scores() -> tuple[np.ndarray, np.ndarray]:
        values, labels = [], []
        for batch in dataset:
            values.append(predict(batch["image"]).numpy())
            labels.append(batch["label"].numpy())
        return np.concatenate(values).astype(np.float32), np.concatenate(labels).astype(np.int64)

    return scores


# --------------------------------------------------------------------------- the stages


def stage_class(config) -> type[Pu]:
    """The method of a run with --pu_split=easy_hard: the final stage once a split is given."""
    return Final if config.pu.pu_split_file else Imitation


class Imitation(Pu):
    """The split's temporary model: BCE towards the base's 0/1 predictions on Pu's batches."""

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.base = restore_classifier(self.experiment, base_model_config(self.config), check_base(self.config))

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return IMITATION_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        images = tf.concat([batch["image"], batch["unlabeled_image"]], axis=0)  # (2B, S, S, 3), weak views
        scores = binary_scores(model(images, training=True)["logits_sup"])
        base_scores = binary_scores(self.base(images, training=False)["logits_sup"])
        return imitation_loss(scores=scores, base_scores=base_scores)


class Final(Pu):
    """Split-PU's model: positives and easy images (weak view), hard images (weak and strong)."""

    @classmethod
    def images_per_step(cls, config) -> int:
        split = load_split(config)
        num_easy = int(split.easy.sum())
        easy, hard = unlabeled_batch_sizes(config.train.train_batch_size, num_easy, split.num_examples - num_easy)
        return config.train.train_batch_size + easy + 2 * hard

    @property
    def split(self) -> Split:
        if getattr(self, "_split", None) is None:
            split = load_split(self.config)
            expected = self.experiment.source.num_examples(self.config.data.train_split)
            if split.num_examples != expected:
                raise FlagError(
                    f"--pu_split_file={self.config.pu.pu_split_file} splits {split.num_examples} images, but "
                    f"--train_split={self.config.data.train_split} has {expected}: use the split's --train_split."
                )
            if not split.easy.any():
                raise FlagError(f"--pu_split_file={self.config.pu.pu_split_file} has no easy image to train on.")
            self._split = split
        return self._split

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.base = restore_classifier(self.experiment, base_model_config(self.config), check_base(self.config))
        easy = np.flatnonzero(self.split.easy)
        # The base's probabilities of the easy images, by row (the easy source numbers them so).
        probabilities = 1.0 / (1.0 + np.exp(-self.split.base_scores[easy].astype(np.float64)))
        self.easy_targets = tf.Variable(probabilities.astype(np.float32), trainable=False, name="easy_targets")
        num_positives = self.experiment.source.num_examples(self.config.data.train_split, self.labeled_subset())
        self.positive_ratio = num_positives / len(easy)
        logging.info("Easy loss: %d labeled positives, %d easy images (positive ratio %.4f).",
                     num_positives, len(easy), self.positive_ratio)
        if self.split.easy.all():
            logging.warning("The split has no hard image: training on positives and easy images only.")
        features = semi.classifier_input_dim(model)
        # SimSiam's predictor: a bottleneck MLP (its paper: 2048 -> 512 -> 2048).
        self.predictor = keras.Sequential([
            keras.layers.Dense(max(1, features // 4), use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(features),
        ], name="simsiam_predictor")
        self.predictor.build((None, features))

    def extra_trainable_variables(self) -> list:
        return self.predictor.trainable_variables

    def checkpoint_items(self) -> dict:
        return {"simsiam_predictor": self.predictor}

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return FINAL_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        parts = [batch["image"], batch["easy_image"]] + ([batch["hard_image"]] if "hard_image" in batch else [])
        outputs = model(tf.concat(parts, axis=0), training=True)  # one pass: batch norm sees all of them
        sizes = [tf.shape(p)[0] for p in parts]
        scores = tf.split(binary_scores(outputs["logits_sup"]), sizes)
        hard = None
        if len(parts) == 3:
            features = tf.split(outputs["supervised_head_input"], sizes)[2]
            predictions = self.predictor(tf.cast(features, tf.float32), training=True)
            weak_scores, strong_scores = tf.split(scores[2], 2)
            weak_predictions, strong_predictions = tf.split(predictions, 2)
            weak_features, strong_features = tf.split(features, 2)
            hard = {
                "weak_scores": weak_scores, "strong_scores": strong_scores,
                "weak_predictions": weak_predictions, "strong_predictions": strong_predictions,
                "weak_features": weak_features, "strong_features": strong_features,
            }
            if self.config.pu.pu_feature_weight > 0:
                if LOW_LEVEL_FEATURES not in outputs:
                    raise FlagError(f"--pu_feature_weight: this model has no {LOW_LEVEL_FEATURES} output "
                                    "(a ResNet's); use --pu_feature_weight=0.")
                hard["low_level"] = tf.split(outputs[LOW_LEVEL_FEATURES], sizes)[2]
                # The hard images' two views, (2H, S, S, 3), as the model saw them.
                hard["base_low_level"] = self.base(batch["hard_image"], training=False)[LOW_LEVEL_FEATURES]
        pu = self.config.pu
        return split_pu_loss(
            positive_scores=scores[0], easy_scores=scores[1],
            easy_targets=tf.gather(self.easy_targets, batch["easy_row"]), hard=hard,
            hard_weight=pu.pu_hard_weight, sim_weight=pu.pu_sim_weight, feature_weight=pu.pu_feature_weight,
            target_weight=JS_TARGET_WEIGHT, threshold=CONSISTENCY_THRESHOLD, positive_ratio=self.positive_ratio,
        )

    def train_batches(self, batch_size, context, *, start_step, cache):
        """B positives, and the easy and hard shares of B unlabeled images (`unlabeled_batch_sizes`)."""
        split, experiment = self.split, self.experiment
        easy_indices, hard_indices = np.flatnonzero(split.easy), np.flatnonzero(~split.easy)
        easy_size, hard_size = unlabeled_batch_sizes(batch_size, len(easy_indices), len(hard_indices))
        replicas = context.num_replicas_in_sync if context is not None else 1
        weak, strong = semi.view_fn(self.config, "weak"), semi.view_fn(self.config, "strong")
        train_split = self.config.data.train_split

        def stream(size, indices, views):
            return experiment.training_batches(
                size, context, view_fns=views, source=PseudoLabeledSource(experiment.source, train_split, indices),
                start_example=base.start_example(start_step, size * replicas, context), cache=cache)

        streams = {
            "positive": experiment.training_batches(
                batch_size, context, view_fns=(weak,), subset=self.labeled_subset(), cache=cache,
                start_example=base.start_example(start_step, self.config.train.train_batch_size, context)),
            "easy": stream(easy_size, easy_indices, (weak,)),
        }
        if hard_size:
            streams["hard"] = stream(hard_size, hard_indices, (weak, strong))

        def merge(parts):
            merged = {**parts["positive"], "easy_image": parts["easy"]["image"], "easy_row": parts["easy"]["label"]}
            if "hard" in parts:
                merged["hard_image"] = parts["hard"]["image"]
            return merged

        return tf.data.Dataset.zip(streams).map(tf.autograph.experimental.do_not_convert(merge))


def load_split(config) -> Split:
    path = config.pu.pu_split_file
    if not tf.io.gfile.exists(path):
        raise FlagError(f"--pu_split_file={path}: no such file; it is the pu_split.npz a --pu_split=easy_hard "
                        "run writes in its model_dir.")
    return Split.load(path)


# --------------------------------------------------------------------------- the run


def run(config, model_dir: str, strategy: tf.distribute.Strategy | None = None) -> dict | None:
    """The split (unless saved), then the final model in `<model_dir>/final`; its eval result."""
    from simclr_tf.train.experiment import write_json  # it imports the registry
    from simclr_tf.train.runner import train_and_evaluate

    record = read_json(os.path.join(model_dir, RESULT_FILE))
    if record is not None:
        logging.info("Split-PU finished before in %s: skipped", model_dir)
        return record["result"]
    check_base(config)  # a bad --pu_base_checkpoint fails before anything is built
    split_path = config.pu.pu_split_file or os.path.join(model_dir, SPLIT_FILE)
    if config.pu.pu_split_file:
        load_split(config)
    elif tf.io.gfile.exists(split_path):
        logging.info("Split-PU split: %s (made before)", split_path)
    else:
        tf.io.gfile.makedirs(model_dir)
        make_split(config, os.path.join(model_dir, SPLIT_DIR), strategy).save(split_path)
    final_config = config.replace(pu={"pu_split_file": split_path})
    source = data_lib.get_source(config.data.dataset, config.data.data_dir, skip_bad_images=config.data.skip_bad_images)
    stats = Split.load(split_path).stats(positive_class_ids(config.pu.positive_classes, source.class_names))
    logging.info("Split-PU split of the unlabeled images: %s", json.dumps(stats))
    final_dir = os.path.join(model_dir, FINAL_DIR)
    result = train_and_evaluate(final_config, final_dir, strategy)
    write_json(os.path.join(model_dir, RESULT_FILE),
               {"split_file": split_path, "split": stats, "final_dir": final_dir, "result": result})
    return result


def make_split(config, split_dir: str, strategy: tf.distribute.Strategy | None) -> Split:
    """Trains the temporary model an epoch a run until it agrees with the base; the split it gives."""
    from simclr_tf.train.experiment import Experiment  # it imports the registry
    from simclr_tf.train.runner import train_and_evaluate

    pu = config.pu
    stage = config.replace(pu={"pu_split_file": ""}, train={"mode": "train", "keep_hub_module_max": 0})
    experiment = Experiment.create(stage, split_dir, strategy)
    with experiment.strategy.scope():
        base_model = restore_classifier(experiment, base_model_config(config), check_base(config))
        temporary = experiment.build(config.model, num_classes=2, stop_gradient_to_supervised_head=False,
                                     drop_unused_projection_layers=True)
    base_scores, labels = score_function(experiment, base_model)()
    temporary_scores_now = score_function(experiment, temporary)
    epoch_steps = config_lib.epoch_steps_for(config, experiment.num_train_examples, Imitation.examples_per_step(config))
    previous = config.train.checkpoint
    for epoch in range(1, pu.pu_split_max_epochs + 1):
        epoch_dir = os.path.join(split_dir, f"epoch_{epoch}")
        scores_path = os.path.join(epoch_dir, EPOCH_SCORES_FILE)
        if not tf.io.gfile.exists(scores_path):
            epoch_config = stage.replace(
                train={"train_steps": epoch_steps, "checkpoint": previous},
                # The head comes from the previous epoch: zero it only when starting from --checkpoint.
                model={"zero_init_logits_layer": config.model.zero_init_logits_layer and epoch == 1},
            )
            train_and_evaluate(epoch_config, epoch_dir, strategy)
            checkpoints.restore_model_weights(temporary, checkpoints.resolve_checkpoint_path(epoch_dir), exact=False,
                                              required_prefixes=(f"{checkpoints.MODEL_ROOT}/",))
            _save_npz(scores_path, scores=temporary_scores_now()[0])
        temporary_scores = _load_npz(scores_path)["scores"]
        agreement = float(np.mean((temporary_scores > 0) == (base_scores > 0)))
        logging.info("Split-PU temporary model, epoch %d: agrees with the base on %.4f of the unlabeled images "
                     "(stops above %s)", epoch, agreement, pu.pu_split_agreement)
        if agreement > pu.pu_split_agreement:
            break
        previous = epoch_dir
    return Split(easy=split_easy_hard(base_scores, temporary_scores), base_scores=base_scores,
                 temporary_scores=temporary_scores, labels=labels, epochs=epoch, agreement=agreement)
