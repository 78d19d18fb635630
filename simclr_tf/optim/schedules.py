"""Learning-rate scaling and the SimCLR warm-up + cosine schedule."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

LEARNING_RATE_SCALINGS = ("linear", "sqrt")


def scaled_learning_rate(
    base_learning_rate: float, train_batch_size: int, learning_rate_scaling: str
) -> float:
    """`base * batch / 256` (linear) or `base * sqrt(batch)` (sqrt), as the original."""
    if learning_rate_scaling == "linear":
        return base_learning_rate * train_batch_size / 256.0
    if learning_rate_scaling == "sqrt":
        return base_learning_rate * math.sqrt(train_batch_size)
    raise ValueError(
        f"Unknown --learning_rate_scaling {learning_rate_scaling!r}; expected one of {LEARNING_RATE_SCALINGS}"
    )


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to the scaled rate, then cosine decay to 0.

    lr(step) = step / warmup * scaled                    for step < warmup_steps
             = scaled * (1 + cos(pi * t)) / 2            otherwise,
    with t = min(step - warmup, total - warmup) / (total - warmup), as the original
    (warm-up ignored when `warmup_steps == 0`).

    Args:
      base_learning_rate: rate before batch-size scaling.
      train_batch_size: global batch size used for scaling.
      learning_rate_scaling: "linear" or "sqrt".
      warmup_steps: steps of linear warm-up (>= 0).
      total_steps: total training steps (>= warmup_steps).
      name: optional name scope.
    """

    def __init__(
        self,
        base_learning_rate: float,
        train_batch_size: int,
        learning_rate_scaling: str = "linear",
        warmup_steps: int = 0,
        total_steps: int = 1,
        name: str | None = None,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps < warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
        self.base_learning_rate = base_learning_rate
        self.train_batch_size = train_batch_size
        self.learning_rate_scaling = learning_rate_scaling
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.name = name
        # Validates the scaling name now rather than at the first step.
        self.scaled_learning_rate = scaled_learning_rate(
            base_learning_rate, train_batch_size, learning_rate_scaling
        )

    def __call__(self, step):
        with tf.name_scope(self.name or "WarmUpAndCosineDecay"):
            step = tf.cast(step, tf.float32)
            scaled = tf.constant(self.scaled_learning_rate, tf.float32)
            warmup = float(self.warmup_steps)
            # max(.., 1) only matters when total == warmup: no decay phase is ever
            # trained, and this avoids 0/0.
            decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
            progress = tf.minimum(step - warmup, decay_steps) / decay_steps
            cosine = 0.5 * scaled * (1.0 + tf.cos(math.pi * progress))
            if not self.warmup_steps:
                return cosine
            return tf.where(step < warmup, step / warmup * scaled, cosine)

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "train_batch_size": self.train_batch_size,
            "learning_rate_scaling": self.learning_rate_scaling,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "name": self.name,
        }
