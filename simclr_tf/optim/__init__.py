"""Optimisation: LARS, the warm-up + cosine schedule and the optimizer factory."""

from simclr_tf.optim.factory import LARS_EXCLUDE, OPTIMIZERS, build_optimizer
from simclr_tf.optim.lars import LARS
from simclr_tf.optim.schedules import WarmUpAndCosineDecay, scaled_learning_rate

__all__ = [
    "LARS",
    "LARS_EXCLUDE",
    "OPTIMIZERS",
    "WarmUpAndCosineDecay",
    "build_optimizer",
    "scaled_learning_rate",
]
