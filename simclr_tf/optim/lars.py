"""LARS (You, Gitman & Ginsburg, 2017) as a Keras 3 optimizer, with SimCLR's semantics.

Per variable w with gradient g (after the usual cross-replica sum):
  g <- g + weight_decay * w                     unless excluded from weight decay
  classic momentum (default):
    trust = eeta * ||w|| / ||g||                if both norms > 0 and not excluded
                                                from layer adaptation, else 1
    v <- momentum * v + lr * trust * g
    w <- w - (momentum * v + lr * trust * g  if nesterov else v)
  non-classic momentum (lr applied after momentum):
    v <- momentum * v + g
    u = momentum * v + g  if nesterov else v
    trust = eeta * ||w|| / ||u||                (same guards)
    w <- w - lr * trust * u

Weight decay is L2 added to the gradient (so it is also scaled by the trust ratio),
not Keras's decoupled decay: the base class's own decay is switched off.

Exclusions are regular expressions searched (`re.search`) in `variable.path`, e.g.
"head_supervised/dense/kernel", because in Keras 3 the path carries the layer names while
`variable.name` is only the leaf ("kernel"). A plain substring such as "batch_norm" is a
valid pattern. Variables without a `path` (raw tf.Variables) are matched by `name`.
"""

from __future__ import annotations

import re
from typing import Sequence

import keras
import tensorflow as tf

EETA_DEFAULT = 0.001


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum and L2 weight decay.

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: momentum coefficient.
      weight_decay: L2 coefficient added to the gradient of non-excluded variables.
      eeta: trust coefficient in `eeta * ||w|| / ||g||`.
      nesterov: use Nesterov momentum.
      classic_momentum: apply lr (and trust ratio on the gradient) inside the momentum
        update; if False, apply them to the momentum-accumulated update instead.
      exclude_from_weight_decay: patterns; matching variables get no weight decay.
      exclude_from_layer_adaptation: patterns; matching variables use trust ratio 1.
        None means the same as `exclude_from_weight_decay` (as the original).
      name: optimizer name (prefix of its variables).
      **kwargs: base `keras.optimizers.Optimizer` arguments (clipnorm, use_ema, ...),
        except `weight_decay`, which is this class's own.

    Example:
      opt = LARS(0.1, weight_decay=1e-6, exclude_from_weight_decay=["batch_norm", "bias"])
      opt.apply_gradients(zip(grads, model.trainable_variables))

    Reference: https://arxiv.org/abs/1708.03888; google-research/simclr tf2/lars_optimizer.py.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = EETA_DEFAULT,
        nesterov: bool = False,
        classic_momentum: bool = True,
        exclude_from_weight_decay: Sequence[str] | None = None,
        exclude_from_layer_adaptation: Sequence[str] | None = None,
        name: str = "lars",
        **kwargs,
    ):
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)  # The base class only takes floats.
        # weight_decay=None keeps the base class from applying decoupled decay.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.weight_decay = float(weight_decay or 0.0)
        self.momentum = float(momentum)
        self.eeta = float(eeta)
        self.nesterov = bool(nesterov)
        self.classic_momentum = bool(classic_momentum)
        # Stored under private names: the base class has an `exclude_from_weight_decay`
        # method that an attribute would shadow.
        self._wd_exclude = list(exclude_from_weight_decay or [])
        if exclude_from_layer_adaptation is None:
            self._adaptation_exclude = list(self._wd_exclude)
        else:
            self._adaptation_exclude = list(exclude_from_layer_adaptation)

    def _apply_weight_decay(self, variables):
        # Decay is L2 inside `update_step`; never the base class's decoupled kind.
        return

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Decided once here, from the Keras variables: `update_step` receives the
        # underlying tf.Variable, which has no `path`.
        self._use_decay = tuple(
            bool(self.weight_decay) and not _matches(v, self._wd_exclude) for v in variables
        )
        self._use_adaptation = tuple(not _matches(v, self._adaptation_exclude) for v in variables)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        momentum = tf.cast(self.momentum, dtype)
        grad = tf.convert_to_tensor(gradient)  # Densifies IndexedSlices.
        grad = tf.cast(grad, dtype)
        param = tf.convert_to_tensor(variable)
        v = self.momentums[index]

        if self._use_decay[index]:
            grad += tf.cast(self.weight_decay, dtype) * param

        if self.classic_momentum:
            trust = self._trust_ratio(param, grad, self._use_adaptation[index])
            scaled_lr = lr * trust
            next_v = momentum * v + scaled_lr * grad
            step = momentum * next_v + scaled_lr * grad if self.nesterov else next_v
        else:
            next_v = momentum * v + grad
            update = momentum * next_v + grad if self.nesterov else next_v
            trust = self._trust_ratio(param, update, self._use_adaptation[index])
            step = lr * trust * update
        self.assign(v, next_v)
        self.assign_sub(variable, step)

    def _trust_ratio(self, param: tf.Tensor, direction: tf.Tensor, adapt: bool):
        if not adapt:
            return tf.constant(1.0, param.dtype)
        w_norm = tf.norm(param, ord=2)
        d_norm = tf.norm(direction, ord=2)
        # Guarding the denominator first keeps the unused branch free of inf/NaN.
        safe_d_norm = tf.where(d_norm > 0, d_norm, tf.ones_like(d_norm))
        ratio = tf.cast(self.eeta, param.dtype) * w_norm / safe_d_norm
        return tf.where(tf.logical_and(w_norm > 0, d_norm > 0), ratio, tf.ones_like(ratio))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.weight_decay,
                "eeta": self.eeta,
                "nesterov": self.nesterov,
                "classic_momentum": self.classic_momentum,
                "exclude_from_weight_decay": list(self._wd_exclude),
                "exclude_from_layer_adaptation": list(self._adaptation_exclude),
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "LARS":
        # The base class deserialises the schedule in place; leave the caller's dict alone.
        return super().from_config(dict(config), custom_objects=custom_objects)


def _matches(variable, patterns: Sequence[str]) -> bool:
    path = getattr(variable, "path", None) or variable.name
    return any(re.search(pattern, path) is not None for pattern in patterns)
