"""Projection and supervised heads of SimCLR(v2), as the original `tf2/model.py`.

Differences from the original: plain constructor arguments instead of flags, and the
projection head returns `(output, hiddens)` in every mode (the original's 'linear'
mode returned None and 'none' returned a single tensor).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from simclr_tf.models.resnet import BatchNormRelu, inherit_trainable

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")

_serializable = keras.saving.register_keras_serializable(package="simclr_tf")


@_serializable
class LinearLayer(keras.layers.Layer):
    """Dense layer (kernel ~ N(0, 0.01)), optionally followed by batch norm.

    Args:
        units: output width; None keeps the input width.
        use_bias: with `use_bn`, the dense has no bias and the BN's beta plays that
            role (BN `center=use_bias`); without `use_bn`, the dense's bias.
        use_bn: add a batch norm (no ReLU) after the dense.
        zero_init: zero-initialise the kernel (SimCLR's `zero_init_logits_layer`).
        batch_norm_decay, global_bn: for the batch norm.
    """

    def __init__(
        self,
        units: int | None,
        use_bias: bool = True,
        use_bn: bool = False,
        zero_init: bool = False,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.use_bn = use_bn
        self.zero_init = zero_init
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        # Both created in build(): the dense's width may depend on the input's.
        self.dense = None
        self.batch_norm = None
        self.trainable = trainable

    def _out_units(self, input_shape) -> int:
        return int(input_shape[-1]) if self.units is None else self.units

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"{self.name} expects (batch, features) inputs, got {input_shape}")
        self.dense = keras.layers.Dense(
            self._out_units(input_shape),
            use_bias=self.use_bias and not self.use_bn,
            kernel_initializer=(
                "zeros" if self.zero_init else keras.initializers.RandomNormal(stddev=0.01)
            ),
            name="dense",
        )
        self.dense.build(input_shape)
        if self.use_bn:
            self.batch_norm = BatchNormRelu(
                relu=False,
                center=self.use_bias,
                batch_norm_decay=self.batch_norm_decay,
                global_bn=self.global_bn,
                name="batch_norm",
            )
            self.batch_norm.build(self.compute_output_shape(input_shape))
        inherit_trainable(self, [self.dense, self.batch_norm] if self.use_bn else [self.dense])

    def call(self, inputs, training=False):
        outputs = self.dense(inputs)
        if self.batch_norm is not None:
            outputs = self.batch_norm(outputs, training=training)
        return outputs

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self._out_units(input_shape))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            units=self.units,
            use_bias=self.use_bias,
            use_bn=self.use_bn,
            zero_init=self.zero_init,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
        )
        return config


def num_projection_layers(mode: str, num_layers: int) -> int:
    """Number of dense layers in a projection head of this `mode`."""
    if mode not in PROJ_HEAD_MODES:
        raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {mode!r}")
    return {"none": 0, "linear": 1, "nonlinear": num_layers}[mode]


@_serializable
class ProjectionHead(keras.layers.Layer):
    """SimCLR projection head g(.).

    Modes:
        'nonlinear': `num_layers` layers; all but the last keep the input width and
            use bias + BN + ReLU; the last maps to `out_dim` with BN, no bias, no ReLU.
        'linear': one layer to `out_dim` with BN, no bias.
        'none': identity.

    `call(x)` returns `(output, hiddens)`, hiddens[0] = x and hiddens[k] = output of
    layer k. The supervised head reads `hiddens[ft_proj_selector]` (0: the backbone
    features, k: after k layers, -1: the last layer); Python indexing, so
    -len(hiddens) <= ft_proj_selector < len(hiddens).

    `drop_unused_layers=True` builds only the layers up to the selected one (what
    fine-tuning keeps, as in the paper); `output` is then the selected hidden.
    """

    def __init__(
        self,
        mode: str = "nonlinear",
        out_dim: int = 128,
        num_layers: int = 3,
        ft_proj_selector: int = 0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        drop_unused_layers: bool = False,
        name: str = "projection_head",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if mode == "nonlinear" and num_layers < 1:
            raise ValueError(f"num_proj_layers must be >= 1 for a nonlinear head, got {num_layers}")
        num_hiddens = num_projection_layers(mode, num_layers) + 1
        if not -num_hiddens <= ft_proj_selector < num_hiddens:
            raise ValueError(
                f"ft_proj_selector={ft_proj_selector} is out of range for proj_head_mode="
                f"{mode!r} with {num_hiddens - 1} projection layer(s): it must be in "
                f"[{-num_hiddens}, {num_hiddens - 1}]"
            )
        self.mode = mode
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.ft_proj_selector = ft_proj_selector
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.drop_unused_layers = drop_unused_layers
        self._num_dense = num_hiddens - 1
        # Non-negative index of the hidden the supervised head reads.
        self.selected_index = ft_proj_selector % num_hiddens

        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        layers = []
        if mode == "linear":
            layers.append(
                LinearLayer(out_dim, use_bias=False, use_bn=True, name="l_0", **bn_args)
            )
        elif mode == "nonlinear":
            for j in range(num_layers):
                last = j == num_layers - 1
                layers.append(
                    LinearLayer(
                        out_dim if last else None,
                        use_bias=not last,
                        use_bn=True,
                        name=f"nl_{j}",
                        **bn_args,
                    )
                )
        if drop_unused_layers:
            layers = layers[: self.selected_index]
        self.linear_layers = tuple(layers)  # see resnet._TRACKING_NOTE
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.linear_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, inputs, training=False):
        hiddens = [inputs]
        for j, layer in enumerate(self.linear_layers):
            x = layer(hiddens[-1], training=training)
            # Middle layers of the full head have a ReLU, also when later ones are dropped.
            if self.mode == "nonlinear" and j != self._num_dense - 1:
                x = ops.relu(x)
            hiddens.append(x)
        return hiddens[-1], hiddens

    def compute_output_shape(self, input_shape):
        shapes = [tuple(input_shape)]
        for layer in self.linear_layers:
            shapes.append(tuple(layer.compute_output_shape(shapes[-1])))
        return shapes[-1], shapes

    def supervised_input_shape(self, input_shape) -> tuple:
        """Shape of `hiddens[ft_proj_selector]` for inputs of `input_shape`."""
        return self.compute_output_shape(input_shape)[1][self.selected_index]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            mode=self.mode,
            out_dim=self.out_dim,
            num_layers=self.num_layers,
            ft_proj_selector=self.ft_proj_selector,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            drop_unused_layers=self.drop_unused_layers,
        )
        return config


@_serializable
class SupervisedHead(keras.layers.Layer):
    """Linear classifier (dense with bias, no BN) producing `logits_sup`.

    Named `head_supervised`: optimizers select its variables by that substring.
    """

    def __init__(
        self,
        num_classes: int,
        zero_init: bool = False,
        name: str = "head_supervised",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.zero_init = zero_init
        self.linear_layer = LinearLayer(
            num_classes, use_bias=True, use_bn=False, zero_init=zero_init, name="linear_layer"
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        self.linear_layer.build(input_shape)

    def call(self, inputs, training=False):
        return self.linear_layer(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_classes=self.num_classes, zero_init=self.zero_init)
        return config
