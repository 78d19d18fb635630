"""Running means of step metrics that work inside `strategy.run`."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf


class VectorMean(keras.metrics.Metric):
    """Element-wise running mean of a fixed-length vector (e.g. a class distribution)."""

    def __init__(self, size: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.size = size
        self.total = self.add_variable(shape=(size,), initializer="zeros", aggregation="sum", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", aggregation="sum", name="count")

    def update_state(self, values):
        self.total.assign_add(tf.cast(values, self.dtype))
        self.count.assign_add(tf.ones([], self.dtype))

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)

    def get_config(self):
        return {**super().get_config(), "size": self.size}


class MeanMetrics:
    """A `keras.metrics.Mean` per name (a `VectorMean` for `vector_sizes`); create under `strategy.scope()`.

    Keras metric variables are sync-on-read sums, so updates made on every replica are
    combined into one global mean when read.
    """

    def __init__(self, names: Iterable[str], prefix: str, vector_sizes: Mapping[str, int] | None = None):
        self.prefix = prefix
        self._metrics = {name: keras.metrics.Mean(name=f"{prefix}/{name}") for name in names}
        self._vectors = {
            name: VectorMean(size, name=f"{prefix}/{name}") for name, size in (vector_sizes or {}).items()
        }

    @property
    def names(self) -> list[str]:
        return list(self._metrics)

    def update(self, values: Mapping[str, tf.Tensor]) -> None:
        for name, value in values.items():
            if name in self._metrics:
                self._metrics[name].update_state(value)
            elif name in self._vectors:
                self._vectors[name].update_state(value)

    def results(self) -> dict[str, float]:
        """Current means of the scalars keyed by `prefix/name`."""
        return {m.name: float(m.result()) for m in self._metrics.values()}

    def vector_results(self) -> dict[str, np.ndarray]:
        """Current means of the vector metrics keyed by `prefix/name`."""
        return {m.name: np.asarray(m.result()) for m in self._vectors.values()}

    def reset(self) -> None:
        for metric in (*self._metrics.values(), *self._vectors.values()):
            metric.reset_state()


def first_non_finite(values: Mapping[str, float]) -> str | None:
    """Name of the first NaN/Inf value, or None."""
    for name, value in values.items():
        if not math.isfinite(value):
            return name
    return None
