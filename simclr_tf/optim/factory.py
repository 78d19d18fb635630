"""Builds the optimizer named by --optimizer, with the original's settings."""

from __future__ import annotations

from typing import Callable

import keras

from simclr_tf.optim.lars import LARS

# Never decayed by any optimizer: normalisation parameters and a ViT's embeddings (the
# ViT and DeiT recipes' exclusions). Substrings of `variable.path`.
NO_DECAY = ("batch_norm", "layer_norm", "position_embedding", "class_token")
# As the original: LARS neither decays nor adapts batch norm, biases or the supervised
# head (whose L2 penalty goes into the loss instead; see
# simclr_tf.losses.variables_with_loss_weight_decay).
LARS_EXCLUDE = (*NO_DECAY, "bias", "head_supervised")

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


def _adamw(
    learning_rate: LearningRate, momentum: float, weight_decay: float
) -> keras.optimizers.Optimizer:
    del momentum
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=float(weight_decay))
    # Keras matches these against the variable's leaf name, not its path.
    optimizer.exclude_from_weight_decay(var_names=[*ADAMW_EXCLUDE_LEAVES])
    return optimizer


# Leaf names of NO_DECAY's variables (LayerNorm/BatchNorm gamma and beta), and biases.
ADAMW_EXCLUDE_LEAVES = ("gamma", "beta", "bias", "position_embedding", "class_token")

OPTIMIZERS: dict[str, Callable[[LearningRate, float, float], keras.optimizers.Optimizer]] = {
    "lars": _lars,
    "momentum": _momentum,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(
    name: str,
    *,
    learning_rate: LearningRate,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
) -> keras.optimizers.Optimizer:
    """'lars' (LARS with LARS_EXCLUDE), 'momentum' (Nesterov SGD), 'adam' or 'adamw' (decoupled decay)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown --optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    if isinstance(learning_rate, int):
        learning_rate = float(learning_rate)  # Keras optimizers reject ints.
    return OPTIMIZERS[name](learning_rate, momentum, weight_decay)
