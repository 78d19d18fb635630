"""Builds the optimizer named by --optimizer, with the original's settings."""

from __future__ import annotations

from typing import Callable

import keras

from simclr_tf.optim.lars import LARS

# As the original: LARS neither decays nor adapts batch norm, biases or the supervised
# head (whose L2 penalty goes into the loss instead; see
# simclr_tf.losses.variables_with_loss_weight_decay). Substrings of `variable.path`.
LARS_EXCLUDE = ("batch_norm", "bias", "head_supervised")

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


def _momentum(
    learning_rate: LearningRate, momentum: float, weight_decay: float
) -> keras.optimizers.Optimizer:
    # Weight decay for SGD/Adam is an L2 term in the loss, not part of the optimizer.
    del weight_decay
    return keras.optimizers.SGD(learning_rate, momentum=float(momentum), nesterov=True)


def _adam(
    learning_rate: LearningRate, momentum: float, weight_decay: float
) -> keras.optimizers.Optimizer:
    del momentum, weight_decay  # Adam's defaults, as the original; decay is in the loss.
    return keras.optimizers.Adam(learning_rate)


def _lars(
    learning_rate: LearningRate, momentum: float, weight_decay: float
) -> keras.optimizers.Optimizer:
    return LARS(
        learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        exclude_from_weight_decay=list(LARS_EXCLUDE),
    )


OPTIMIZERS: dict[str, Callable[[LearningRate, float, float], keras.optimizers.Optimizer]] = {
    "lars": _lars,
    "momentum": _momentum,
    "adam": _adam,
}


def build_optimizer(
    name: str,
    *,
    learning_rate: LearningRate,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
) -> keras.optimizers.Optimizer:
    """'lars' (LARS with LARS_EXCLUDE), 'momentum' (Nesterov SGD) or 'adam'."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown --optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    if isinstance(learning_rate, int):
        learning_rate = float(learning_rate)  # Keras optimizers reject ints.
    return OPTIMIZERS[name](learning_rate, momentum, weight_decay)
