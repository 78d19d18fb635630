"""Model noise for training students (Noisy Student): dropout and stochastic depth.

Both are `RandomDrop`: in training, each unit (dropout) or each example's whole residual
branch (stochastic depth, `per_example=True`) is zeroed with probability `rate` and the
rest scaled by 1 / (1 - rate), so the expected output is the input; at inference the layer
is the identity. Neither has weights: checkpoints are the same with or without them.

Keras' own `Dropout` draws the same mask on every replica of a MirroredStrategy (its seed
state is mirrored); here the draw folds in the replica id, so replicas drop independently.
The seed state is not checkpointed (as Keras'), so a resumed run draws a fresh noise sequence.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


def stochastic_depth_rates(rate: float, num_blocks: int) -> list[float]:
    """Drop rate of residual blocks 1..num_blocks: linear from rate / num_blocks up to `rate`.

    The stem is never dropped (survival 1.0); the last block survives with 1 - rate, the
    linear decay of Huang et al. (2016) used by EfficientNet and Noisy Student.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
    return [rate * (i + 1) / num_blocks for i in range(num_blocks)]


def _replica_id() -> tf.Tensor:
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: one caller
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


@keras.saving.register_keras_serializable(package="simclr_tf")
class RandomDrop(keras.layers.Layer):
    """Inverted dropout of units, or of whole examples with `per_example=True`."""

    def __init__(self, rate: float, per_example: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.per_example = per_example
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        shape = tf.shape(inputs)
        if self.per_example:
            shape = tf.concat([shape[:1], tf.ones_like(shape[1:])], axis=0)
        seed = tf.cast(self.seed_generator.next(), tf.int32)
        seed = tf.random.experimental.stateless_fold_in(seed, _replica_id())
        keep = tf.random.stateless_uniform(shape, seed) >= self.rate
        scale = tf.cast(1.0 / (1.0 - self.rate), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(rate=self.rate, per_example=self.per_example, seed=self.seed)
        return config
