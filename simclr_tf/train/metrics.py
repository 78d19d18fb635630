"""Running means of step metrics that work inside `strategy.run`."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import keras
import tensorflow as tf


class MeanMetrics:
    """A `keras.metrics.Mean` per name; create under `strategy.scope()`.

    Keras metric variables are sync-on-read sums, so updates made on every replica are
    combined into one global mean when read.
    """

    def __init__(self, names: Iterable[str], prefix: str):
        self.prefix = prefix
        self._metrics = {name: keras.metrics.Mean(name=f"{prefix}/{name}") for name in names}

    @property
    def names(self) -> list[str]:
        return list(self._metrics)

    def update(self, values: Mapping[str, tf.Tensor]) -> None:
        for name, value in values.items():
            if name in self._metrics:
                self._metrics[name].update_state(value)

    def results(self) -> dict[str, float]:
        """Current means keyed by `prefix/name`."""
        return {m.name: float(m.result()) for m in self._metrics.values()}

    def reset(self) -> None:
        for metric in self._metrics.values():
            metric.reset_state()


def first_non_finite(values: Mapping[str, float]) -> str | None:
    """Name of the first NaN/Inf value, or None."""
    for name, value in values.items():
        if not math.isfinite(value):
            return name
    return None
