"""Noisy Student (Xie et al., CVPR 2020): a teacher's pseudo-labels train a noised student, in rounds.

`--train_mode=noisy_student --iterations=N` runs N rounds, round i in `<model_dir>/round_<i>/`:

1. labelling: the teacher (`--teacher_checkpoint` in round 1, then the previous round's
   evaluated model) predicts every image of `--train_split` in its eval view, without
   noise. Images whose top probability reaches `--pseudo_label_threshold` are kept and
   balanced per class (`select_pseudo_labels`); the selection is written once, atomically,
   to `<round_dir>/pseudo_labels.npz`, which a resumed round reads again.
2. the student: a normal training run of this method in the round's directory (resumed
   from its checkpoints): cross-entropy on the labeled subset's true labels plus, weighted,
   cross-entropy against the teacher's targets on the pseudo-labelled images; both parts
   through the strong view (RandAugment + Cutout), the student noised by `--dropout_rate`
   and `--stochastic_depth_rate`.
3. evaluation: the round's result goes to `<round_dir>/noisy_student_round.json` (a round
   with one is skipped on a rerun) and every round's to `<model_dir>/noisy_student_rounds.json`.

Reference: google-research/noisystudent. filter_unlabel.py keeps a prediction when its
probability reaches a threshold (its scripts: 0.3), then brings every class to a target
count (`--num_image`): a class with fewer images gets copies of each (there by a random
fraction of a copy, here deterministically, the most confident first), one with more keeps
its most confident. main.py weighs the two parts by their batch sizes,
`(lab_loss * B + unl_loss * mu B) / B`, so the unlabeled weight defaults to mu here; soft
targets are the teacher's probabilities, hard ones its argmax.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from simclr_tf import data as data_lib
from simclr_tf import losses
from simclr_tf.config import SEMI_SUPERVISED_MODES, FlagError
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods import semi
from simclr_tf.train import checkpoints

PSEUDO_LABELS_FILE = "pseudo_labels.npz"
ROUND_FILE = "noisy_student_round.json"
ROUNDS_FILE = "noisy_student_rounds.json"
NOISY_STUDENT_METRICS = base.SUPERVISED_METRICS + ("unlabeled_loss", "pseudo_label_acc")
# Shuffle buffer of the pseudo-labelled examples' file order when they are not cached (the
# pipeline shuffles again with its own buffer); decoded images, so it is bounded.
ORDER_SHUFFLE_BUFFER = 10_000


# --------------------------------------------------------------------------- selection


def target_count(kept_count: int, num_classes: int, per_class: int) -> int:
    """Images per class after balancing: `per_class`, or when 0 the mean kept count per class."""
    if per_class > 0:
        return per_class
    return max(1, math.floor(kept_count / num_classes + 0.5)) if kept_count else 0


def select_pseudo_labels(
    probs: np.ndarray, *, threshold: float, per_class: int, hard: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's predictions -> the pseudo-labelled examples, filtered and class-balanced.

    Args:
      probs: (N, C) teacher probabilities of the N unlabeled examples.
      threshold: keep an example when its top probability is >= this.
      per_class: T, examples per (predicted) class after balancing; 0 = the mean kept
        count per class, round(kept / C).
      hard: targets are one-hot argmaxes (else the probabilities themselves).

    Returns:
      `(indices, targets)`: indices (K,) int64 into the N examples, sorted, an index
      repeated as often as the example is copied; targets (K, C) float32. A class with
      n >= T kept examples keeps its T most confident; one with 0 < n < T has each of them
      T // n times and its T % n most confident once more, so it also counts T; a class
      with none stays empty. Ties keep the lower index first.
    """
    probs = np.asarray(probs, np.float32)
    num_classes = probs.shape[1]
    confidence = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    kept = confidence >= threshold
    count = target_count(int(kept.sum()), num_classes, per_class)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(kept & (predicted == label))
        if not len(members):
            continue
        ranked = members[np.argsort(-confidence[members], kind="stable")]  # most confident first
        copies, extra = divmod(count, len(ranked))
        chosen += [np.tile(ranked, copies), ranked[:extra]]
    indices = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros([0], np.int64)
    if hard:
        targets = np.eye(num_classes, dtype=np.float32)[predicted[indices]]
    else:
        targets = probs[indices]
    return indices, targets.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A round's pseudo-labels as `pseudo_labels.npz` holds them."""

    indices: np.ndarray  # (K,) int64, sorted, repeated per copy
    targets: np.ndarray  # (K, C) float32
    true_labels: np.ndarray  # (K,) int64: the split's labels, for monitoring only
    num_examples: int  # N, of the split the indices point into
    kept: int  # examples whose top probability reached the threshold
    per_class: int  # T

    def distinct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(examples (U,), their targets (U, C), their true labels (U,)), one row per distinct example."""
        examples, first = np.unique(self.indices, return_index=True)
        return examples, self.targets[first], self.true_labels[first]

    def stats(self) -> dict:
        hits = self.targets.argmax(axis=1) == self.true_labels
        return {
            "examples": self.num_examples, "above_threshold": self.kept, "per_class": self.per_class,
            "selected": len(self.indices), "distinct": len(np.unique(self.indices)),
            "accuracy": float(hits.mean()) if len(hits) else 0.0,
        }

    def save(self, path: str) -> None:
        """Writes atomically (a temporary file, then a rename): a kill leaves no partial file."""
        buffer = io.BytesIO()
        np.savez(buffer, indices=self.indices, targets=self.targets, true_labels=self.true_labels,
                 num_examples=self.num_examples, kept=self.kept, per_class=self.per_class)
        tmp = f"{path}.tmp{os.getpid()}"
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(tmp, path, overwrite=True)

    @classmethod
    def load(cls, path: str) -> "Selection":
        with tf.io.gfile.GFile(path, "rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
            return cls(**{name: arrays[name] if arrays[name].ndim else int(arrays[name]) for name in arrays.files})


# --------------------------------------------------------------------------- data


class PseudoLabeledSource:
    """The selected examples of one split of `base`, each as often as it was selected.

    Yields `(image, row)`: `row` numbers the distinct selected examples in split order,
    where the method looks up their targets; it takes the place of the label. The split is
    read in file order (as evaluation reads it, so the teacher's predictions line up),
    then copied, sharded per input pipeline and, when asked, shuffled.
    """

    def __init__(self, base: data_lib.Source, split: str, indices: np.ndarray):
        self.base, self.split = base, split
        self.name = f"{base.name} (pseudo-labelled)"
        self.num_classes, self.class_names = base.num_classes, base.class_names
        self.copies = np.bincount(indices, minlength=base.num_examples(split)).astype(np.int64)  # (N,)
        self.rows = np.full(len(self.copies), -1, np.int64)  # (N,)
        self.rows[self.copies > 0] = np.arange(int((self.copies > 0).sum()))

    def num_examples(self, split: str, labeled_subset=None) -> int:
        return int(self.copies.sum())

    def as_dataset(self, split, *, shuffle_files, input_context=None, seed=None) -> tf.data.Dataset:
        if split != self.split:
            raise ValueError(f"Pseudo-labels were made for split {self.split!r}, not {split!r}.")
        copies, rows = tf.constant(self.copies), tf.constant(self.rows)  # (N,), (N,)

        @tf.autograph.experimental.do_not_convert
        def selected(i, example):
            return copies[i] > 0

        @tf.autograph.experimental.do_not_convert
        def repeated(i, example):
            return tf.data.Dataset.from_tensors((example[0], rows[i])).repeat(copies[i])

        ds = self.base.as_dataset(split, shuffle_files=False).enumerate()
        ds = ds.filter(selected).flat_map(repeated)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if shuffle_files:
            buffer = min(self.num_examples(split), ORDER_SHUFFLE_BUFFER)
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
        return ds


# --------------------------------------------------------------------------- loss


def noisy_student_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    pseudo_logits: tf.Tensor,
    targets: tf.Tensor,
    unlabeled_weight: float,
    pseudo_true_labels: tf.Tensor | None = None,
) -> tuple[tf.Tensor, base.Metrics]:
    """`CE(labels, labeled) + unlabeled_weight * mean_u CE(targets, pseudo)`.

    Args:
      labeled_logits: (B, C) on the labeled images.
      labels: (B,) class ids or (B, C) one-hot.
      pseudo_logits: (U, C) on the pseudo-labelled images.
      targets: (U, C) the teacher's targets (probabilities, or one-hot); constants.
      unlabeled_weight: weight of the pseudo-labelled term (main.py's: mu = U / B).
      pseudo_true_labels: (U,) true labels, only for the "pseudo_label_acc" metric.

    Returns:
      `(loss, metrics)`; "unlabeled_loss" is logged before its weight, "pseudo_label_acc" is
      the argmax of the targets against the true labels (0 without them).
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    targets = tf.stop_gradient(tf.cast(targets, tf.float32))
    unsup_loss = tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(pseudo_logits, tf.float32))
    )
    metrics["unlabeled_loss"] = unsup_loss
    metrics["pseudo_label_acc"] = tf.constant(0.0)
    if pseudo_true_labels is not None:
        predicted = tf.argmax(targets, axis=-1, output_type=tf.int32)
        hits = tf.equal(predicted, tf.cast(pseudo_true_labels, tf.int32))
        metrics["pseudo_label_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
    return sup_loss + unlabeled_weight * unsup_loss, metrics


# --------------------------------------------------------------------------- the method


class NoisyStudent(semi.SemiSupervised):
    """`--train_mode=noisy_student`: one round's student; `run` drives the rounds."""

    name = "noisy_student"
    unlabeled_views = ("strong",)
    # mu 5: the SVHN script's --unlabel_ratio (local_scripts/svhn/run.sh); threshold 0.3:
    # its filter's --min_threshold. The unlabeled weight defaults to mu (see the module).
    defaults = {"unlabeled_batch_ratio": 5, "pseudo_label_threshold": 0.3}

    @property
    def unlabeled_loss_weight(self) -> float:
        given = self.semi.unlabeled_loss_weight
        return float(self.setting(self.config, "unlabeled_batch_ratio")) if given is None else given

    # -- the rounds -------------------------------------------------------------------
    @classmethod
    def run(cls, config, model_dir: str, strategy: tf.distribute.Strategy | None = None) -> dict | None:
        """Runs the rounds not finished yet; returns the last round's eval result.

        `--mode=eval` evaluates `model_dir` as one round's directory.
        """
        if config.train.mode == "eval":
            return super().run(config, model_dir, strategy)
        if config.train.mode != "train_then_eval":
            raise FlagError(
                "--mode: --train_mode=noisy_student evaluates every round (its student teaches the next, and "
                "each round's top-1 is reported); use --mode=train_then_eval, or --mode=eval with "
                "--model_dir=<a round's directory>."
            )
        from simclr_tf.train.experiment import write_json  # the experiment imports the registry

        records, teacher = [], config.distill.teacher_checkpoint
        for index in range(1, config.noisy_student.iterations + 1):
            directory = round_dir(model_dir, index)
            record = read_json(os.path.join(directory, ROUND_FILE))
            if record is None:
                if index == 1 and not tf.io.gfile.exists(os.path.join(directory, PSEUDO_LABELS_FILE)):
                    resolve_teacher(teacher)  # a bad --teacher_checkpoint fails before anything is built
                logging.info("Noisy Student round %d of %d in %s, teacher %s",
                             index, config.noisy_student.iterations, directory, teacher)
                result = super().run(round_config(config, teacher, index), directory, strategy)
                record = {
                    "round": index, "teacher": teacher, "model_dir": directory,
                    "top_1": result.get("eval/label_top_1_accuracy"),
                    "pseudo_labels": Selection.load(os.path.join(directory, PSEUDO_LABELS_FILE)).stats(),
                    "result": result,
                }
                write_json(os.path.join(directory, ROUND_FILE), record)
            else:
                logging.info("Noisy Student round %d finished before (top-1 %s): skipped", index, record["top_1"])
            records.append(record)
            write_json(os.path.join(model_dir, ROUNDS_FILE), {"rounds": records})
            teacher = directory
        logging.info("Noisy Student top-1 per round: %s", ", ".join(
            f"{r['round']}: {r['top_1']:.4f}" if r["top_1"] is not None else f"{r['round']}: -" for r in records))
        return records[-1]["result"]

    # -- state ------------------------------------------------------------------------
    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        super().setup(model, optimizer)
        _, targets, true_labels = self.selection.distinct()
        # Variables, not graph constants: ImageNet's soft targets would not fit in a graph.
        self.targets = tf.Variable(targets, trainable=False, name="pseudo_label_targets")  # (U, C)
        self.true_labels = tf.Variable(true_labels, trainable=False, name="pseudo_label_true_labels")  # (U,)

    @property
    def selection(self) -> Selection:
        """This round's pseudo-labels: read from the round's directory, made first if missing."""
        if getattr(self, "_selection", None) is None:
            path = os.path.join(self.experiment.model_dir, PSEUDO_LABELS_FILE)
            if tf.io.gfile.exists(path):
                logging.info("Pseudo-labels of this round: %s (made before)", path)
            else:
                label_train_split(self.experiment).save(path)
            selection = Selection.load(path)
            expected = self.experiment.source.num_examples(self.config.data.train_split)
            if selection.num_examples != expected:
                raise FlagError(
                    f"--train_split={self.config.data.train_split} has {expected} examples, but {path} "
                    f"pseudo-labels {selection.num_examples}: use that round's split, or a new --model_dir."
                )
            self._selection = selection
        return self._selection

    # -- the step ---------------------------------------------------------------------
    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return NOISY_STUDENT_METRICS

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        labeled_logits, pseudo_logits = self.logits_of(model, batch["image"], batch["unlabeled_image"])
        rows = batch["unlabeled_row"]  # (mu*B,)
        targets = tf.gather(self.targets, rows)  # (mu*B, C)
        loss, metrics = noisy_student_loss(
            labeled_logits=labeled_logits,
            labels=batch["label"],
            pseudo_logits=pseudo_logits,
            targets=targets,
            unlabeled_weight=self.unlabeled_loss_weight,
            pseudo_true_labels=tf.gather(self.true_labels, rows),
        )
        classes = tf.argmax(targets, axis=-1, output_type=tf.int32)
        metrics[semi.PSEUDO_LABEL_CLASSES] = common.pseudo_label_class_fractions(
            classes, tf.ones_like(classes, tf.float32), self.experiment.source.num_classes
        )
        return loss, metrics

    # -- data -------------------------------------------------------------------------
    def train_batches(self, batch_size, context, *, start_step, cache):
        """B labeled images and mu * B pseudo-labelled ones, all in the strong view."""
        mu = self.setting(self.config, "unlabeled_batch_ratio")
        strong = (self.view_fn("strong"),)
        labeled = self.experiment.training_batches(
            batch_size, context, view_fns=strong, subset=self.labeled_subset(),
            start_example=base.start_example(start_step, self.config.train.train_batch_size, context),
            cache=cache,
        )
        source = PseudoLabeledSource(self.experiment.source, self.config.data.train_split, self.selection.indices)
        pseudo = self.experiment.training_batches(
            mu * batch_size, context, view_fns=strong, source=source,
            start_example=base.start_example(start_step, self.examples_per_step(self.config), context),
            cache=cache,
        )
        return tf.data.Dataset.zip(labeled, pseudo).map(tf.autograph.experimental.do_not_convert(
            lambda l, u: {**l, "unlabeled_image": u["image"], "unlabeled_row": u["label"]}
        ))


# --------------------------------------------------------------------------- labelling


def label_train_split(experiment) -> Selection:
    """The teacher's filtered, balanced pseudo-labels of `--train_split` (eval view, no noise)."""
    from simclr_tf.train.experiment import teacher_model_config  # the experiment imports us

    config = experiment.config
    teacher_dir = config.distill.teacher_checkpoint
    path = resolve_teacher(teacher_dir)
    teacher = experiment.build(
        teacher_model_config(config),
        num_classes=experiment.source.num_classes,
        stop_gradient_to_supervised_head=False,
        drop_unused_projection_layers=True,
    )
    root = teacher_checkpoint_root(teacher_dir)
    checkpoints.restore_model_weights(
        teacher, path, exact=False, required_prefixes=(f"{checkpoints.MODEL_ROOT}/",), checkpoint_root=root
    )
    predict = tf.function(
        lambda images: tf.nn.softmax(tf.cast(teacher(images, training=False)["logits_sup"], tf.float32)),
        reduce_retracing=True,
    )
    dataset = data_lib.build_dataset(
        experiment.source, split=config.data.train_split, batch_size=config.train.eval_batch_size,
        is_training=False, num_views=1, image_size=config.model.image_size,
        color_jitter_strength=0.0, use_blur=False,
    )
    probs, labels = [], []
    for batch in dataset:  # in file order: index i is the split's i-th example
        probs.append(predict(batch["image"]).numpy())
        labels.append(batch["label"].numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels).astype(np.int64)
    threshold = NoisyStudent.setting(config, "pseudo_label_threshold")
    ns = config.noisy_student
    indices, targets = select_pseudo_labels(
        probs, threshold=threshold, per_class=ns.noisy_student_per_class, hard=ns.pseudo_label_type == "hard"
    )
    if not len(indices):
        raise FlagError(
            f"--pseudo_label_threshold={threshold}: no image of --train_split has a teacher probability that "
            f"high (the largest is {probs.max():.3f}); lower it."
        )
    kept = int((probs.max(axis=1) >= threshold).sum())
    selection = Selection(
        indices=indices, targets=targets, true_labels=labels[indices], num_examples=len(probs), kept=kept,
        per_class=target_count(kept, probs.shape[1], ns.noisy_student_per_class),
    )
    logging.info("Pseudo-labels by %s (%s): %s", path, root, json.dumps(selection.stats()))
    return selection


def resolve_teacher(teacher: str | None) -> str:
    """The teacher's checkpoint path; a FlagError naming --teacher_checkpoint if there is none."""
    try:
        return checkpoints.resolve_checkpoint_path(teacher or "", flag="teacher_checkpoint")
    except (ValueError, FileNotFoundError) as error:
        raise FlagError(str(error)) from None


def teacher_checkpoint_root(teacher: str) -> str:
    """Which model of the teacher's checkpoint teaches: the one its run evaluated.

    A semi-supervised run (a Noisy Student round included) evaluated its weight average
    with --eval_with_ema (the default); any other run its trained weights.
    """
    from simclr_tf.train.experiment import read_saved_config  # the experiment imports us

    saved = read_saved_config(teacher)
    mode = saved.get("train", {}).get("train_mode")
    averaged = mode in (*SEMI_SUPERVISED_MODES, NoisyStudent.name) and saved.get("semi", {}).get("eval_with_ema", True)
    return "ema_model" if averaged else checkpoints.MODEL_ROOT


def round_dir(model_dir: str, index: int) -> str:
    return os.path.join(model_dir, f"round_{index}")


def round_config(config, teacher: str, index: int):
    """Round `index`'s config: `teacher` teaches; from round 2 on, with the architecture in its config.json."""
    from simclr_tf.train.experiment import TEACHER_FIELDS  # the experiment imports us

    distill = {"teacher_checkpoint": teacher}
    if index > 1:  # --teacher_* describe the first teacher only
        distill.update({f"teacher_{field}": None for field in TEACHER_FIELDS})
    return config.replace(distill=distill)


def read_json(path: str) -> dict | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)
