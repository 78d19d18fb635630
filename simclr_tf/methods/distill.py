"""`--train_mode=distill`: SimCLRv2's third step, a frozen teacher's soft labels."""

from __future__ import annotations

import functools

from absl import logging
import keras
import tensorflow as tf

from simclr_tf import data as data_lib
from simclr_tf import losses
from simclr_tf.methods import base, common
from simclr_tf.train import checkpoints

DISTILL_METRICS = ("distill_loss", "distill_agreement")


class Distill(base.Method):
    """The student matches the teacher's softmax at `--distill_temperature` on unlabeled data.

    With `--distill_label_weight` w > 0 the batch also holds a labeled part and the loss
    is (1 - w) * distillation + w * cross-entropy on the labeled examples.
    Views (Beyer et al., "A good teacher is patient and consistent", CVPR 2022): teacher
    and student see the same crop/flip view (`--distill_views=consistent`, SimCLRv2's), or
    the teacher sees the un-augmented image (`fixed`); `--mixup_alpha` > 0 shows both the
    same mixup of two views ("function matching").
    """

    name = "distill"

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.teacher = self.build_teacher()
        self.optimizer = optimizer

    def build_teacher(self) -> keras.Model:
        """The teacher, restored in full and frozen; called under the strategy scope."""
        from simclr_tf.train.experiment import teacher_model_config  # the experiment imports us

        path = checkpoints.resolve_checkpoint_path(self.config.distill.teacher_checkpoint, flag="teacher_checkpoint")
        teacher = self.experiment.build(
            teacher_model_config(self.config),
            num_classes=self.experiment.source.num_classes,
            stop_gradient_to_supervised_head=False,
            drop_unused_projection_layers=True,
        )
        # Every teacher variable must come from the checkpoint; projection layers above
        # the selected one that it also holds (a converted original model) go unused.
        checkpoints.restore_model_weights(
            teacher, path, exact=False, required_prefixes=(f"{checkpoints.MODEL_ROOT}/",)
        )
        teacher.trainable = False
        logging.info("Teacher restored from %s", path)
        return teacher

    @property
    def label_weight(self) -> float:
        return self.config.distill.distill_label_weight

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return DISTILL_METRICS + (base.SUPERVISED_METRICS if self.label_weight > 0 else ())

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        temperature = self.config.distill.distill_temperature
        unlabeled = batch["image"]  # (B, H, W, 3); its labels are never used
        teacher_images = batch.get("teacher_image", unlabeled)  # fixed views: un-augmented
        if self.config.distill.mixup_alpha > 0:
            unlabeled = teacher_images = self.mixup(unlabeled)
        teacher_logits = self.teacher(teacher_images, training=False)["logits_sup"]
        if self.label_weight <= 0:
            student_logits = model(unlabeled, training=True)["logits_sup"]
            return losses.distillation_loss(
                teacher_logits=teacher_logits, student_logits=student_logits, temperature=temperature
            )
        # One student pass over both parts, so batch norm sees them together.
        logits = model(tf.concat([unlabeled, batch["labeled_image"]], axis=0), training=True)["logits_sup"]
        student_logits, labeled_logits = tf.split(logits, [tf.shape(unlabeled)[0], -1], axis=0)
        distill, metrics = losses.distillation_loss(
            teacher_logits=teacher_logits, student_logits=student_logits, temperature=temperature
        )
        labeled, labeled_metrics = losses.supervised_loss(labels=batch["labeled_label"], logits=labeled_logits)
        metrics.update(labeled_metrics)
        return (1.0 - self.label_weight) * distill + self.label_weight * labeled, metrics

    def mixup(self, images: tf.Tensor) -> tf.Tensor:
        """The batch mixed in pairs; the draw depends on (--seed, step, replica) only."""
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        seed = tf.stack([tf.constant(self.config.train.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))
        weights, partners = common.mixup_draw(seed, tf.shape(images)[0], alpha=self.config.distill.mixup_alpha)
        return common.mix_images(images, weights, partners)

    def train_batches(self, batch_size, context, *, start_step, cache):
        first = base.start_example(start_step, self.examples_per_step(self.config), context)
        if self.config.distill.distill_views == "fixed":
            unlabeled = self.experiment.training_batches(
                batch_size, context, view_fns=self.fixed_view_fns(), start_example=first, cache=cache
            ).map(tf.autograph.experimental.do_not_convert(
                lambda b: {"label": b["label"], **dict(zip(("image", "teacher_image"), tf.split(b["image"], 2)))}
            ))
        else:
            unlabeled = self.experiment.training_batches(batch_size, context, start_example=first, cache=cache)
        if self.label_weight <= 0:
            return unlabeled
        labeled = self.experiment.training_batches(
            batch_size, context, subset=self.labeled_subset(), start_example=first, cache=cache
        )
        return tf.data.Dataset.zip(unlabeled, labeled).map(tf.autograph.experimental.do_not_convert(
            lambda u, l: {**u, "labeled_image": l["image"], "labeled_label": l["label"]}
        ))

    def fixed_view_fns(self) -> tuple:
        """The student's crop/flip view (as the consistent pipeline's) and the teacher's eval view."""
        cfg = self.config
        student = functools.partial(
            _crop_flip_view, image_size=cfg.model.image_size, use_flip=cfg.data.use_flip,
            crop_min_area=cfg.data.crop_min_area,
            affine=data_lib.Affine(cfg.data.affine_rotation_degrees, cfg.data.affine_scale_change, cfg.data.affine_shift),
        )
        return student, functools.partial(_eval_view, image_size=cfg.model.image_size)


def _crop_flip_view(image, seed, **kwargs):
    del seed  # SimCLR's crop draws from the stateful generator, as in every other mode
    return data_lib.preprocess_for_train(image, **kwargs)


def _eval_view(image, seed, *, image_size):
    del seed
    return data_lib.preprocess_for_eval(image, image_size)
