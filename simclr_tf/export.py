"""SavedModel export of a `SimCLRModel`: `<model_dir>/saved_model/<step>/`, as the original.

What a loaded export offers (`m = tf.saved_model.load(path)`):

- `m(images, trainable=False)` / `m(images, trainable=True)`: the same dict of named
  outputs either way (`initial_conv`, `initial_max_pool`, `block_group1`..`block_group4`,
  `final_avg_pool`, `proj_head_input`, `proj_head_output`, `supervised_head_input`,
  `logits_sup` if the model has a supervised head). `trainable=True` runs batch norm in
  training mode (batch statistics, moving averages updated); images are float32
  (N, H, W, 3) in [0, 1], any H and W (a ViT: the training image size; its outputs have
  `patch_embedding` instead of `initial_conv` and `initial_max_pool`).
- `m.signatures["serving_default"](images=...)`: the inference outputs, for TF Serving.
- `m.trainable_variables`: every trainable weight (`m.variables`: all of them,
  `m.non_trainable_variables`: BN moving statistics), so the whole network can be
  fine-tuned with a plain `tf.GradientTape` (the original's exports could not: upstream
  google-research/simclr#116).

The export is the plain network: one device, per-replica batch norm, float32, nothing
frozen and no stop-gradient before the supervised head, whatever the run that trained it.
It is written to a temporary directory and renamed, so a failed export never leaves a
half-written `<step>/` behind.
"""

from __future__ import annotations

import os
import uuid

from absl import logging
import keras
import tensorflow as tf

EXPORT_SUBDIR = "saved_model"

# Settings of the training run that do not belong in an exported network (float32: the
# variables are anyway, and a mixed-precision compute dtype is a property of the hardware).
_INFERENCE_OVERRIDES = dict(
    global_bn=False, fine_tune_after_block=-1, stop_gradient_to_supervised_head=False, dtype="float32"
)


def inference_copy(model: keras.Model) -> keras.Model:
    """A single-device copy of `model` with `_INFERENCE_OVERRIDES`, holding its weights."""
    config = {**model.get_config(), **_INFERENCE_OVERRIDES, "trainable": True}
    copy = type(model).from_config(config)
    copy.build(model.image_input_shape)
    source = {v.path: v for v in model.weights}
    for variable in copy.weights:
        variable.assign(source[variable.path].numpy())
    return copy


def build_export_module(model: keras.Model) -> tf.Module:
    """The object `tf.saved_model.save` writes: see the module docstring."""
    copy = inference_copy(model)
    # AutoTrackable (unlike tf.Module) lets `trainable_variables` be a saved attribute.
    module = tf.__internal__.tracking.AutoTrackable()
    # Keras variables wrap tf.Variables; the SavedModel holds the tf.Variables.
    module.variables = [v.value for v in copy.weights]
    module.trainable_variables = [v.value for v in copy.trainable_weights]
    module.non_trainable_variables = [v.value for v in copy.non_trainable_weights]
    # The seed states of the noise layers (--dropout_rate, --stochastic_depth_rate): the
    # training-mode signature reads them, so the SavedModel must hold them, but they are
    # not weights (Keras' `weights` leaves them out of `variables`' list).
    weight_ids = {id(v) for v in copy.weights}
    module.random_states = [v.value for v in copy.variables if id(v) not in weight_ids]
    spec = tf.TensorSpec(copy.image_input_shape, tf.float32, name="images")

    @tf.function(autograph=False)
    def call(images, trainable):
        return dict(copy(images, training=trainable))

    module.serving_default = call.get_concrete_function(spec, trainable=False)
    call.get_concrete_function(spec, trainable=True)
    module.__call__ = call
    return module


def write_saved_model(model: keras.Model, export_dir: str) -> str:
    """Exports `model` to `export_dir` (replacing it) via a temporary sibling directory."""
    parent = os.path.dirname(export_dir.rstrip("/")) or "."
    tf.io.gfile.makedirs(parent)
    tmp_dir = os.path.join(parent, f".tmp-{os.path.basename(export_dir.rstrip('/'))}-{uuid.uuid4().hex}")
    module = build_export_module(model)
    try:
        tf.saved_model.save(
            module,
            tmp_dir,
            signatures={"serving_default": module.serving_default},
        )
        if tf.io.gfile.exists(export_dir):
            tf.io.gfile.rmtree(export_dir)
        tf.io.gfile.rename(tmp_dir, export_dir)
    finally:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
    return export_dir


def exported_steps(model_dir: str) -> list[int]:
    """Steps of the complete exports under `<model_dir>/saved_model/`, ascending."""
    root = os.path.join(model_dir, EXPORT_SUBDIR)
    if not tf.io.gfile.isdir(root):
        return []
    return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(root) if d.rstrip("/").isdigit())


def export_step(model: keras.Model, model_dir: str, step: int, *, keep_max: int) -> str | None:
    """Writes `<model_dir>/saved_model/<step>/`, keeping the newest `keep_max` exports.

    `keep_max <= 0` (`--keep_hub_module_max=0`) exports nothing and returns None.
    """
    if keep_max <= 0:
        return None
    path = write_saved_model(model, os.path.join(model_dir, EXPORT_SUBDIR, str(step)))
    for old in exported_steps(model_dir)[:-keep_max]:
        tf.io.gfile.rmtree(os.path.join(model_dir, EXPORT_SUBDIR, str(old)))
    logging.info("Exported SavedModel %s", path)
    return path
