"""What the semi-supervised methods share: labeled + unlabeled batches, the weight average.

A step reads B = --train_batch_size labeled images (one weak view) and mu * B unlabeled
ones (mu = --unlabeled_batch_ratio; the views the method names, e.g. weak and strong),
from two streams that are each resumable at the exact position: the labeled subset
(--labeled_fraction / --labeled_per_class) and the whole train split (its labels are
read only for monitoring, never by a loss). An epoch is a pass over the unlabeled
stream. Every method keeps an exponential moving average of the weights
(--ema_decay), which evaluation and export use with --eval_with_ema.

Batch keys: "image" (B, S, S, 3), "label" (B,), "unlabeled_image" (V*mu*B, S, S, 3)
view-major in the order of `unlabeled_views`, "unlabeled_label" (mu*B,).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import keras
import tensorflow as tf

from simclr_tf.config import FlagError
from simclr_tf.data import semi_augment
from simclr_tf.methods import base
from simclr_tf.methods import common
from simclr_tf.methods.ema import WeightAverage

# Per-step scalars of the methods that pseudo-label (see `common.pseudo_label_metrics`).
PSEUDO_LABEL_METRICS = ("unlabeled_loss", "mask_rate", "pseudo_label_acc")
PSEUDO_LABEL_CLASSES = "pseudo_label_class_fraction"


class SemiSupervised(base.Method):
    """Base of the methods that train on labeled and unlabeled batches at once."""

    # The unlabeled views a step reads, in order: "weak" or "strong" each.
    unlabeled_views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    # Values of the flags whose default (None) is the method's own: FixMatch's here.
    defaults: ClassVar[dict[str, float]] = {
        "unlabeled_batch_ratio": 7, "pseudo_label_threshold": 0.95, "unlabeled_loss_weight": 1.0,
    }
    # Flags of the `semi` section this method does not read: giving one is an error.
    unused_flags: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_flags(cls, config, *, resuming: bool) -> None:
        for flag in cls.unused_flags:
            if getattr(config.semi, flag) is not None:
                raise FlagError(
                    f"--{flag}: --train_mode={cls.name} does not use it (README: Semi-supervised "
                    "methods lists each method's flags); leave it out."
                )

    @classmethod
    def setting(cls, config, flag: str) -> float:
        """A `semi` flag's value: as given, else this method's default."""
        value = getattr(config.semi, flag)
        return cls.defaults[flag] if value is None else value

    @classmethod
    def examples_per_step(cls, config) -> int:
        return cls.setting(config, "unlabeled_batch_ratio") * config.train.train_batch_size

    @classmethod
    def images_per_step(cls, config) -> int:
        return config.train.train_batch_size + cls.examples_per_step(config)

    @property
    def semi(self):
        return self.config.semi

    @property
    def unlabeled_loss_weight(self) -> float:
        return self.setting(self.config, "unlabeled_loss_weight")

    @property
    def pseudo_label_threshold(self) -> float:
        return self.setting(self.config, "pseudo_label_threshold")

    # -- state ------------------------------------------------------------------------
    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.optimizer = optimizer
        self.average = WeightAverage(self.build_model, self.semi.ema_decay)

    def checkpoint_items(self) -> dict:
        return {"ema_model": self.average.model}

    def after_restore(self, model: keras.Model, report) -> None:
        if report.source != "model_dir":  # resuming restored the average with the rest
            self.average.copy_from(model)

    def after_update(self, model: keras.Model) -> None:
        self.average.update(model)

    def eval_model(self, model: keras.Model) -> keras.Model:
        return self.average.model if self.semi.eval_with_ema else model

    def eval_checkpoint_root(self) -> str:
        return "ema_model" if self.semi.eval_with_ema else "model"

    def progress(self) -> tf.Tensor:
        """Fraction of training done before this step, in [0, 1] (schedules, ramp-ups)."""
        step = tf.cast(self.optimizer.iterations, tf.float32)
        return tf.minimum(step / float(max(1, self.experiment.train_steps)), 1.0)

    # -- the step's shared parts ------------------------------------------------------
    def split_unlabeled(self, batch: base.Batch) -> list[tf.Tensor]:
        """The unlabeled views, one (mu*B, S, S, 3) tensor per entry of `unlabeled_views`."""
        return tf.split(batch["unlabeled_image"], len(self.unlabeled_views), axis=0)

    def logits_of(self, model: keras.Model, *images: tf.Tensor) -> list[tf.Tensor]:
        """Classifier logits of several image batches in one pass (batch norm sees them together)."""
        logits = model(tf.concat(images, axis=0), training=True)["logits_sup"]
        return tf.split(logits, [tf.shape(i)[0] for i in images], axis=0)

    def vector_metric_sizes(self) -> dict[str, int]:
        return {PSEUDO_LABEL_CLASSES: self.experiment.source.num_classes}

    def with_class_fractions(
        self, metrics: base.Metrics, logits: tf.Tensor, *, threshold: float | None = None, inclusive: bool = True
    ) -> base.Metrics:
        """Adds the class distribution of the pseudo-labels `logits` give (kept ones only)."""
        threshold = self.pseudo_label_threshold if threshold is None else threshold
        labels, mask, _ = common.pseudo_labels(logits, threshold=threshold, inclusive=inclusive)
        metrics[PSEUDO_LABEL_CLASSES] = common.pseudo_label_class_fractions(
            labels, mask, self.experiment.source.num_classes
        )
        return metrics

    # -- data -------------------------------------------------------------------------
    def view_fn(self, kind: str):
        return view_fn(self.config, kind)

    def train_batches(self, batch_size, context, *, start_step, cache):
        mu = self.setting(self.config, "unlabeled_batch_ratio")
        labeled = self.experiment.training_batches(
            batch_size, context, view_fns=(self.view_fn("weak"),), subset=self.labeled_subset(),
            start_example=base.start_example(start_step, self.config.train.train_batch_size, context),
            cache=cache,
        )
        unlabeled = self.experiment.training_batches(
            mu * batch_size, context, view_fns=tuple(self.view_fn(v) for v in self.unlabeled_views),
            start_example=base.start_example(start_step, self.examples_per_step(self.config), context),
            cache=cache,
        )
        return tf.data.Dataset.zip(labeled, unlabeled).map(
            tf.autograph.experimental.do_not_convert(lambda l, u: {**l, "unlabeled_image": u["image"], "unlabeled_label": u["label"]})
        )

    def preview_images(self, batch: base.Batch, count: int) -> tf.Tensor:
        """`count` unlabeled examples, their views side by side."""
        views = self.split_unlabeled(batch)
        return super().preview_images({"image": tf.concat([v[:count] for v in views], axis=0)}, count)


def view_fn(config, kind: str):
    """The seeded weak or strong augmentation, as `data.build_dataset`'s `view_fns` take it."""
    size, semi = config.model.image_size, config.semi
    use_flip = config.data.use_flip
    if kind == "weak":
        return functools.partial(
            _weak, image_size=size, use_flip=use_flip, translate_fraction=semi.weak_translate_fraction
        )
    if kind == "strong":
        return functools.partial(
            _strong, image_size=size, use_flip=use_flip, translate_fraction=semi.weak_translate_fraction,
            num_ops=semi.randaugment_num_ops, cutout_fraction=semi.cutout_fraction,
        )
    raise ValueError(f"Unknown view {kind!r}: use 'weak' or 'strong'.")


def _weak(image, seed, **kwargs):
    return semi_augment.weak_augment(image, seed=seed, **kwargs)


def _strong(image, seed, **kwargs):
    return semi_augment.strong_augment(image, seed=seed, **kwargs)


def classifier_input_dim(model: keras.Model) -> int:
    """Width of the features the model's classifier reads (extra heads read the same)."""
    kernel = next(v for v in model.supervised_head.weights if len(v.shape) == 2)
    return int(kernel.shape[0])
