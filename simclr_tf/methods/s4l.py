"""S4L-Rotation (Zhai et al., ICCV 2019): supervised CE plus 4-way rotation prediction.

Follows google-research/s4l semi_supervised/rotation.py:88-124 and
preprocess.py:207-228. Every image (labeled and unlabeled) is fed in all four rotations;
a rotation head predicts which, the classifier is trained on all four rotations of the
labeled images with their class label repeated (:113-119), and
`loss = CE_class + rot_loss_weight * CE_rot`. Default rot_loss_weight 1.0
(config/s4l_rotation.sh, with equal labeled and unlabeled batches).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.methods import base
from simclr_tf.methods import semi
from simclr_tf.models import heads

Metrics = dict[str, tf.Tensor]

NUM_ROTATIONS = 4


def rotate_batch(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """All four 90-degree rotations of a batch, view-major.

    Args:
      images: (N, H, W, C) with H == W.

    Returns:
      `(rotated, rotation_labels)`: rotated (4N, H, W, C) where rows [k N:(k+1) N] are
      the batch turned k * 90 degrees counter-clockwise (tf.image.rot90, the same turn
      as S4L's preprocess.py:213-218), and rotation_labels (4N,) int32 = k. The class
      labels of the rotated batch are `tf.tile(labels, [4])`.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"rotate_batch: images must be (N, H, W, C), got shape {images.shape}")
    height, width = images.shape[1], images.shape[2]
    if height is not None and width is not None and height != width:
        raise ValueError(
            f"rotate_batch: 90-degree rotations need square images, got {height}x{width}; "
            "crop or resize the rotation inputs to a square size"
        )
    rotated = tf.concat([tf.image.rot90(images, k=k) for k in range(NUM_ROTATIONS)], axis=0)
    batch_size = tf.shape(images)[0]
    rotation_labels = tf.repeat(tf.range(NUM_ROTATIONS, dtype=tf.int32), batch_size)
    return rotated, rotation_labels


def s4l_rotation_loss(
    *,
    labeled_logits: tf.Tensor,
    labels: tf.Tensor,
    rotation_logits: tf.Tensor,
    rotation_labels: tf.Tensor,
    rotation_weight: float = 1.0,
) -> tuple[tf.Tensor, Metrics]:
    """`CE(labeled_logits, labels) + rotation_weight * CE(rotation_logits, rotation_labels)`.

    Args:
      labeled_logits: (B', C) class logits; as S4L, those of the 4 rotations of the
        labeled images (B' = 4B, labels tiled 4 times), or of the upright images only.
      labels: (B',) class ids or (B', C) one-hot.
      rotation_logits: (R, 4) rotation-head logits on the rotated images, e.g. the
        labeled and unlabeled rotated batches concatenated.
      rotation_labels: (R,) in {0, 1, 2, 3}, from `rotate_batch`.
      rotation_weight: S4L's rot_loss_weight.

    Returns:
      `(loss, metrics)`; the rotation CE is the mean over all R rows. S4L averages the
      labeled and unlabeled means (rotation.py:94-107), the same number when the two
      batches have the same size, as in its recipe.
    """
    sup_loss, metrics = losses.supervised_loss(labels=labels, logits=labeled_logits)
    rotation_logits = tf.cast(rotation_logits, tf.float32)
    rotation_labels = tf.cast(rotation_labels, tf.int32)
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=rotation_labels, logits=rotation_logits
    )
    rotation_loss = tf.reduce_mean(per_row)
    hits = tf.equal(tf.argmax(rotation_logits, axis=-1, output_type=tf.int32), rotation_labels)
    metrics["rotation_loss"] = rotation_loss
    metrics["rotation_acc"] = tf.reduce_mean(tf.cast(hits, tf.float32))
    return sup_loss + rotation_weight * rotation_loss, metrics


class S4l(semi.SemiSupervised):
    """`--train_mode=s4l`: labels, plus predicting the rotation of every image (S4L-Rotation)."""

    name = "s4l"
    unlabeled_views = ("weak",)
    # S4L's recipe: as many unlabeled images as labeled ones.
    defaults = {**semi.SemiSupervised.defaults, "unlabeled_batch_ratio": 1}
    unused_flags = ("pseudo_label_threshold", "unlabeled_loss_weight")  # --rotation_loss_weight

    def setup(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        super().setup(model, optimizer)
        self.rotation_head = heads.SupervisedHead(NUM_ROTATIONS, name="head_supervised_rotation")
        self.rotation_head.build((None, semi.classifier_input_dim(model)))

    def extra_trainable_variables(self) -> list:
        return self.rotation_head.trainable_variables

    def checkpoint_items(self) -> dict:
        return {**super().checkpoint_items(), "rotation_head": self.rotation_head}

    def metric_names(self, model: keras.Model) -> tuple[str, ...]:
        return base.SUPERVISED_METRICS + ("rotation_loss", "rotation_acc")

    def vector_metric_sizes(self) -> dict[str, int]:
        return {}  # no pseudo-labels

    def __call__(self, model: keras.Model, batch: base.Batch) -> tuple[tf.Tensor, base.Metrics]:
        (unlabeled,) = self.split_unlabeled(batch)
        # Every image in its four rotations, labeled ones first: as S4L, the classifier
        # trains on all four rotations of the labeled images, the label repeated.
        rotated_labeled, labeled_rotations = rotate_batch(batch["image"])
        rotated_unlabeled, unlabeled_rotations = rotate_batch(unlabeled)
        outputs = model(tf.concat([rotated_labeled, rotated_unlabeled], axis=0), training=True)
        num_labeled = tf.shape(rotated_labeled)[0]
        return s4l_rotation_loss(
            labeled_logits=outputs["logits_sup"][:num_labeled],
            labels=tf.tile(batch["label"], [NUM_ROTATIONS]),
            # One mean over all rotated images (S4L averages the labeled and unlabeled
            # means, the same when mu = 1, its recipe).
            rotation_logits=self.rotation_head(outputs["supervised_head_input"], training=True),
            rotation_labels=tf.concat([labeled_rotations, unlabeled_rotations], axis=0),
            rotation_weight=self.semi.rotation_loss_weight,
        )
