"""An exponential moving average of a model's weights, kept as a second model."""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf


class WeightAverage:
    """`average = decay * average + (1 - decay) * weights` after every update.

    The average is a model of the same architecture (built by `build_model`), so it can
    be called (a Mean Teacher's teacher), evaluated, exported and checkpointed like the
    trained one. Every weight is averaged, batch-norm statistics included, as the
    reference FixMatch / Mean Teacher code averages all of the model's variables.
    """

    def __init__(self, build_model: Callable[[], keras.Model], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"The EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.model = build_model()
        self.model.trainable = False

    def _pairs(self, model: keras.Model) -> list[tuple]:
        ours, theirs = self.model.weights, model.weights
        if [tuple(v.shape) for v in ours] != [tuple(v.shape) for v in theirs]:
            raise ValueError("The weight average and the model differ in architecture.")
        return list(zip(ours, theirs))

    def copy_from(self, model: keras.Model) -> None:
        """Starts the average at the model's weights (a fresh or initialised run)."""
        for average, weight in self._pairs(model):
            average.assign(weight)

    def update(self, model: keras.Model) -> None:
        """One EMA step; call in cross-replica context (all replicas hold the same weights)."""
        for average, weight in self._pairs(model):
            if tf.as_dtype(average.dtype).is_floating:
                average.assign(self.decay * average + (1.0 - self.decay) * tf.cast(weight, average.dtype))
            else:
                average.assign(weight)
