"""ResNet backbone of SimCLR(v2): post-activation ResNet with optional SK and SE.

Follows the architecture of google-research/simclr `tf2/resnet.py` (fixed-padding
convs, BN with epsilon 1e-5, zero-initialised last BN of each residual branch, a
projection shortcut on the first block of every group, selective kernels with a
ResNet-D shortcut and stem, squeeze-excitation), written as Keras 3 layers that take
plain constructor arguments instead of flags.

Naming contract (other modules select variables by `variable.path` substrings):
every batch-norm layer's name contains `batch_norm`, and no other layer's does; block
groups are `block_group1`..`block_group4` inside the backbone `resnet`. Sub-layers
are created in the original's order (stem, then groups; in a block the projection
shortcut first, then the main path, squeeze-excitation last), so `layer.weights`
lists variables in that order.

Every layer builds its sub-layers explicitly in `build()` (so a model can be built
from a shape alone, e.g. with shape-only variables for parameter counts) and applies
a constructor `trainable=False` only once its sub-layers exist (Keras applies it in
`Layer.__init__`, where it would not reach them).

Example:
    backbone = ResNet(resnet_depth=18, width_multiplier=0.25, cifar_stem=True)
    outputs = backbone(images, training=True)  # dict, see `ResNet.call`.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops
import tensorflow as tf

from simclr_tf.models.global_batch_norm import GlobalBatchNormalization
from simclr_tf.models.noise import RandomDrop, stochastic_depth_rates

BATCH_NORM_EPSILON = 1e-5


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (unknown: True)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return True
    return bool(_pywrap_util_port.IsMklEnabled())


# Under oneDNN, graphs holding TensorFlow's fused batch-norm kernel got wrong gradients
# (TF 2.21, AVX2 CPU): for some initialisations of a ResNet-18 x0.25, up to 16% of a
# variable's gradient scale, also in layers the fused op does not feed, while the Keras
# layer, and the fused kernel without oneDNN, agree to ~1e-6 (issue 11's note). So the
# fused kernel is used only without oneDNN; with it, Keras' batch norm is ~11% slower a
# step but correct.
USE_FUSED_BATCH_NORM = not onednn_enabled()
SK_MIN_DIM = 32

# depth -> (block type, blocks per group), as the original. Depth 10 is not in the
# original: one basic block per group, a net that traces and steps in about two thirds
# of the time of depth 18 (measured 12.8 s vs 20.1 s for a traced two-replica step and
# its reference), for tests and quick CPU experiments.
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
BLOCK_GROUP_NAMES = ("block_group1", "block_group2", "block_group3", "block_group4")

_serializable = keras.saving.register_keras_serializable(package="simclr_tf")

# _TRACKING_NOTE: sub-layers are kept in tuples, never lists. Keras 3 turns a list
# attribute into its own TrackedList, which tf.train.Checkpoint does not follow: the
# layers' weights would silently be missing from checkpoints. Tuples are tracked by
# both Keras and TensorFlow (tests/models/test_simclr_model.py checks a checkpoint
# holds every weight).


def scaled_filters(base: int, width_multiplier: float) -> int:
    """Channel count `base * width_multiplier`, rounded, at least 1."""
    return max(1, int(round(base * width_multiplier)))


def _strided(dim: int | None, strides: int) -> int | None:
    # Fixed-padding convs, SAME max-pool and the ResNet-D average pool all give ceil(d / s).
    return None if dim is None else int(math.ceil(dim / strides))


def _strided_shape(shape, strides: int, channels: int) -> tuple:
    batch, height, width = shape[0], shape[1], shape[2]
    return (batch, _strided(height, strides), _strided(width, strides), channels)


def _build_sequence(layers: list[keras.layers.Layer], input_shape) -> tuple:
    """Builds `layers` as a chain and returns the chain's output shape."""
    shape = tuple(input_shape)
    for layer in layers:
        layer.build(shape)
        shape = tuple(layer.compute_output_shape(shape))
    return shape


def inherit_trainable(parent: keras.layers.Layer, created: list[keras.layers.Layer]) -> None:
    """Freezes sub-layers a frozen `parent` creates in build().

    Without this they would be trainable, and re-setting `parent.trainable = False`
    would not fix it: on the TensorFlow backend setting an attribute to its current
    value is a no-op, so the flag is not propagated again.
    """
    if not parent.trainable:
        for layer in created:
            layer.trainable = False


def fixed_padding(inputs, kernel_size: int):
    """Pads H and W by `kernel_size - 1` in total, whatever the input size (unlike SAME)."""
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    return ops.pad(inputs, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])


def fused_batch_norm(bn: keras.layers.BatchNormalization, inputs, training: bool):
    """`bn(inputs, training)` computed by TensorFlow's fused batch-norm kernel.

    Same weights, moving-statistics update and results as the Keras layer, whose
    TensorFlow backend builds batch norm from ~10 elementwise and reduction ops (each
    a pass over the activations, forward and backward): on CPU that was about a fifth
    of a ResNet-18 pretraining step. Inputs in bfloat16/float16 stay in that dtype
    (statistics are float32 inside the kernel) instead of being cast to float32 and back.
    """
    shape = tf.shape(inputs)
    channels = inputs.shape[-1]
    x = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
    x = tf.cast(x, bn.compute_dtype)
    gamma = bn.gamma.value if bn.scale else tf.ones([channels], tf.float32)
    beta = bn.beta.value if bn.center else tf.zeros([channels], tf.float32)
    if training:
        empty = tf.constant([], tf.float32)
        outputs, batch_mean, batch_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
            epsilon=bn.epsilon, data_format="NHWC", is_training=True,
        )
        # The kernel returns the unbiased (n / (n - 1)) variance; Keras keeps the biased one.
        count = tf.cast(tf.size(x) // channels, tf.float32)
        batch_variance *= tf.where(count > 1.0, (count - 1.0) / tf.maximum(count, 1.0), 1.0)
        bn.moving_mean.assign(bn.moving_mean * bn.momentum + batch_mean * (1.0 - bn.momentum))
        bn.moving_variance.assign(
            bn.moving_variance * bn.momentum + batch_variance * (1.0 - bn.momentum)
        )
    else:
        outputs = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=bn.moving_mean.value, variance=bn.moving_variance.value,
            epsilon=bn.epsilon, data_format="NHWC", is_training=False,
        )[0]
    return outputs if len(inputs.shape) == 4 else tf.reshape(outputs, shape)


@_serializable
class BatchNormRelu(keras.layers.Layer):
    """Batch normalisation (optionally cross-replica) followed by an optional ReLU.

    Args:
        relu: apply a ReLU after the normalisation.
        init_zero: initialise gamma to zero (last BN of a residual branch), so each
            block starts as the identity.
        center, scale: as `keras.layers.BatchNormalization`.
        batch_norm_decay: momentum of the moving statistics.
        global_bn: synchronise batch statistics over replicas
            (`GlobalBatchNormalization`: Keras' `synchronized=True`, with the replicas'
            reductions paired by layer).
    """

    def __init__(
        self,
        relu: bool = True,
        init_zero: bool = False,
        center: bool = True,
        scale: bool = True,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.relu = relu
        self.init_zero = init_zero
        self.center = center
        self.scale = scale
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        # Named `batch_normalization` so paths match both `batch_norm` and the original
        # optimizer's `batch_normalization` exclusion pattern.
        self.bn = GlobalBatchNormalization(
            axis=-1,
            momentum=batch_norm_decay,
            epsilon=BATCH_NORM_EPSILON,
            center=center,
            scale=scale,
            gamma_initializer="zeros" if init_zero else "ones",
            synchronized=global_bn,
            name="batch_normalization",
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        self.bn.build(input_shape)

    def call(self, inputs, training=False):
        if self.global_bn or not USE_FUSED_BATCH_NORM or len(inputs.shape) not in (2, 4):
            outputs = self.bn(inputs, training=training)
        else:
            outputs = fused_batch_norm(self.bn, inputs, training=bool(training) and self.bn.trainable)
        return ops.relu(outputs) if self.relu else outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            relu=self.relu,
            init_zero=self.init_zero,
            center=self.center,
            scale=self.scale,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
        )
        return config


@_serializable
class Conv2dFixedPadding(keras.layers.Layer):
    """Bias-free conv; strided convs pad explicitly then use VALID (size-independent padding)."""

    def __init__(self, filters: int, kernel_size: int, strides: int, **kwargs):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.conv2d = keras.layers.Conv2D(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding="same" if strides == 1 else "valid",
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(),
            name="conv2d",
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.strides > 1:
            # The inner conv sees the padded input; Keras checks VALID output sizes.
            pad = self.kernel_size - 1
            shape = (shape[0], *(None if d is None else d + pad for d in shape[1:3]), shape[3])
        self.conv2d.build(shape)

    def call(self, inputs):
        # A 1x1 conv needs no padding: skip the copy. (Conv2D's own explicit padding would
        # avoid the padded copy for 3x3 too, but oneDNN runs it far slower, in bfloat16 ~30x.)
        if self.strides > 1 and self.kernel_size > 1:
            inputs = fixed_padding(inputs, self.kernel_size)
        return self.conv2d(inputs)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides, self.filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides)
        return config


@_serializable
class SelectiveKernelConv(keras.layers.Layer):
    """Selective-kernel 3x3 conv (https://arxiv.org/abs/1903.06586), as SimCLRv2's.

    One 3x3 conv produces two streams of `filters` channels; a squeeze of their sum
    (global pool -> 1x1 conv to `max(int(filters * sk_ratio), 32)` -> BN-ReLU -> 1x1
    conv) gives per-channel softmax weights over the two streams.
    """

    def __init__(
        self,
        filters: int,
        strides: int,
        sk_ratio: float,
        min_dim: int = SK_MIN_DIM,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.sk_ratio = sk_ratio
        self.min_dim = min_dim
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        self.conv = Conv2dFixedPadding(2 * filters, 3, strides, name="conv")
        self.batch_norm = BatchNormRelu(name="batch_norm", **bn_args)
        mid_dim = max(int(filters * sk_ratio), min_dim)
        self.mixing_conv0 = keras.layers.Conv2D(
            mid_dim,
            kernel_size=1,
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(),
            name="mixing_conv0",
        )
        self.mixing_batch_norm = BatchNormRelu(name="mixing_batch_norm", **bn_args)
        self.mixing_conv1 = keras.layers.Conv2D(
            2 * filters,
            kernel_size=1,
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(),
            name="mixing_conv1",
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        streams_shape = _build_sequence([self.conv, self.batch_norm], input_shape)
        pooled_shape = (streams_shape[0], 1, 1, self.filters)
        mixing_layers = [self.mixing_conv0, self.mixing_batch_norm, self.mixing_conv1]
        _build_sequence(mixing_layers, pooled_shape)

    def call(self, inputs, training=False):
        x = self.batch_norm(self.conv(inputs), training=training)  # (N, H, W, 2F)
        streams = ops.stack(ops.split(x, 2, axis=-1))  # (2, N, H, W, F)
        pooled = ops.mean(ops.sum(streams, axis=0), axis=(1, 2), keepdims=True)  # (N, 1, 1, F)
        mixing = self.mixing_conv0(pooled)
        mixing = self.mixing_batch_norm(mixing, training=training)
        mixing = self.mixing_conv1(mixing)  # (N, 1, 1, 2F)
        mixing = ops.softmax(ops.stack(ops.split(mixing, 2, axis=-1)), axis=0)  # (2, N, 1, 1, F)
        return ops.sum(streams * mixing, axis=0)  # (N, H, W, F)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides, self.filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            sk_ratio=self.sk_ratio,
            min_dim=self.min_dim,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
        )
        return config


@_serializable
class SqueezeExcitation(keras.layers.Layer):
    """Squeeze-and-excitation (https://arxiv.org/abs/1709.01507), as the original.

    The bottleneck width is `max(1, int(filters * se_ratio))`, where `filters` is the
    block's base width (not its 4x output width), as in the original.
    """

    def __init__(self, filters: int, se_ratio: float, **kwargs):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.filters = filters
        self.se_ratio = se_ratio
        self.se_reduce = keras.layers.Conv2D(
            max(1, int(filters * se_ratio)),
            kernel_size=1,
            use_bias=True,
            kernel_initializer=keras.initializers.VarianceScaling(),
            name="se_reduce",
        )
        self.se_expand = None  # Its width is the input's channel count, known in build().
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        self.se_expand = keras.layers.Conv2D(
            input_shape[-1],
            kernel_size=1,
            use_bias=True,
            kernel_initializer=keras.initializers.VarianceScaling(),
            name="se_expand",
        )
        inherit_trainable(self, [self.se_expand])
        pooled_shape = (input_shape[0], 1, 1, input_shape[-1])
        _build_sequence([self.se_reduce, self.se_expand], pooled_shape)

    def call(self, inputs):
        squeezed = ops.mean(inputs, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        excitation = self.se_expand(ops.relu(self.se_reduce(squeezed)))
        return ops.sigmoid(excitation) * inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(filters=self.filters, se_ratio=self.se_ratio)
        return config


class _Block(keras.layers.Layer):
    """Shared parts of the residual blocks: projection shortcut, SE, final add-ReLU.

    Subclasses set `expansion` and create their main path in `_make_main_path` (called
    after the shortcut is created, to keep the original's creation order).
    """

    expansion = 1

    def __init__(
        self,
        filters: int,
        strides: int,
        use_projection: bool = False,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        stochastic_depth_rate: float = 0.0,
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.stochastic_depth_rate = stochastic_depth_rate
        self.use_projection = use_projection
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self._bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        out_filters = filters * self.expansion

        self.shortcut_conv = None
        self.shortcut_batch_norm = None
        if use_projection:
            # With SK, the shortcut is ResNet-D's (https://arxiv.org/abs/1812.01187):
            # average-pool to downsample, then a stride-1 1x1 conv.
            shortcut_strides = 1 if sk_ratio > 0 else strides
            self.shortcut_conv = Conv2dFixedPadding(
                out_filters, 1, shortcut_strides, name="shortcut_conv"
            )
            self.shortcut_batch_norm = BatchNormRelu(
                relu=False, name="shortcut_batch_norm", **self._bn_args
            )
        self._make_main_path()
        self.se_layer = (
            SqueezeExcitation(filters, se_ratio, name="se_layer") if se_ratio > 0 else None
        )
        # Drops the whole residual branch of an example; no weights, so created last.
        self.stochastic_depth = (
            RandomDrop(stochastic_depth_rate, per_example=True, name="stochastic_depth")
            if stochastic_depth_rate > 0
            else None
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def _make_main_path(self) -> None:
        raise NotImplementedError

    def _main_path(self) -> list[keras.layers.Layer]:
        raise NotImplementedError

    @property
    def out_filters(self) -> int:
        return self.filters * self.expansion

    def _resnet_d(self) -> bool:
        return self.use_projection and self.sk_ratio > 0

    def _shortcut_pool(self, inputs):
        if self.strides > 1:
            padded = fixed_padding(inputs, 2)
            return ops.average_pool(padded, 2, strides=self.strides, padding="valid")
        return ops.average_pool(inputs, 2, strides=1, padding="same")

    def build(self, input_shape):
        if self.use_projection:
            shortcut_in = input_shape
            if self._resnet_d():
                shortcut_in = _strided_shape(input_shape, self.strides, input_shape[-1])
            _build_sequence([self.shortcut_conv, self.shortcut_batch_norm], shortcut_in)
        out_shape = _build_sequence(self._main_path(), input_shape)
        if self.se_layer is not None:
            self.se_layer.build(out_shape)

    def call(self, inputs, training=False):
        shortcut = inputs
        if self.use_projection:
            if self._resnet_d():
                shortcut = self._shortcut_pool(shortcut)
            shortcut = self.shortcut_conv(shortcut)
            shortcut = self.shortcut_batch_norm(shortcut, training=training)
        x = inputs
        for layer in self._main_path():
            if isinstance(layer, (BatchNormRelu, SelectiveKernelConv)):
                x = layer(x, training=training)
            else:
                x = layer(x)
        if self.se_layer is not None:
            x = self.se_layer(x)
        if self.stochastic_depth is not None:
            # A frozen block (--fine_tune_after_block) is a fixed feature extractor: no noise.
            x = self.stochastic_depth(x, training=training and self.trainable)
        return ops.relu(x + shortcut)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides, self.out_filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            use_projection=self.use_projection,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            stochastic_depth_rate=self.stochastic_depth_rate,
        )
        return config


@_serializable
class ResidualBlock(_Block):
    """Basic block (ResNet-18/34): 3x3 conv, BN-ReLU, 3x3 conv, BN (gamma=0), + shortcut, ReLU.

    As the original, `sk_ratio > 0` only switches the projection shortcut to ResNet-D.
    """

    expansion = 1

    def _make_main_path(self) -> None:
        self.conv1 = Conv2dFixedPadding(self.filters, 3, self.strides, name="conv1")
        self.batch_norm1 = BatchNormRelu(name="batch_norm1", **self._bn_args)
        self.conv2 = Conv2dFixedPadding(self.filters, 3, 1, name="conv2")
        self.batch_norm2 = BatchNormRelu(
            relu=False, init_zero=True, name="batch_norm2", **self._bn_args
        )

    def _main_path(self) -> list[keras.layers.Layer]:
        return [self.conv1, self.batch_norm1, self.conv2, self.batch_norm2]


@_serializable
class BottleneckBlock(_Block):
    """Bottleneck block: 1x1, 3x3 (or SK), 1x1 to 4x filters, last BN gamma=0, + shortcut."""

    expansion = 4

    def _make_main_path(self) -> None:
        self.conv1 = Conv2dFixedPadding(self.filters, 1, 1, name="conv1")
        self.batch_norm1 = BatchNormRelu(name="batch_norm1", **self._bn_args)
        if self.sk_ratio > 0:
            self.sk_conv = SelectiveKernelConv(
                self.filters, self.strides, self.sk_ratio, name="sk_conv", **self._bn_args
            )
            self.conv2 = None
            self.batch_norm2 = None
        else:
            self.sk_conv = None
            self.conv2 = Conv2dFixedPadding(self.filters, 3, self.strides, name="conv2")
            self.batch_norm2 = BatchNormRelu(name="batch_norm2", **self._bn_args)
        self.conv3 = Conv2dFixedPadding(4 * self.filters, 1, 1, name="conv3")
        self.batch_norm3 = BatchNormRelu(
            relu=False, init_zero=True, name="batch_norm3", **self._bn_args
        )

    def _main_path(self) -> list[keras.layers.Layer]:
        middle = [self.sk_conv] if self.sk_conv is not None else [self.conv2, self.batch_norm2]
        return [self.conv1, self.batch_norm1, *middle, self.conv3, self.batch_norm3]


BLOCK_TYPES: dict[str, type[_Block]] = {"basic": ResidualBlock, "bottleneck": BottleneckBlock}


@_serializable
class BlockGroup(keras.layers.Layer):
    """`num_blocks` blocks; the first has the stride and a projection shortcut.

    `stochastic_depth_rates`: each block's drop rate (empty: none dropped).
    """

    def __init__(
        self,
        filters: int,
        block_type: str,
        num_blocks: int,
        strides: int,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        stochastic_depth_rates: tuple[float, ...] | list[float] = (),
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {sorted(BLOCK_TYPES)}, got {block_type!r}")
        rates = tuple(float(r) for r in stochastic_depth_rates) or (0.0,) * num_blocks
        if len(rates) != num_blocks:
            raise ValueError(f"{len(rates)} stochastic_depth_rates for {num_blocks} blocks")
        self.stochastic_depth_rates = rates
        self.filters = filters
        self.block_type = block_type
        self.num_blocks = num_blocks
        self.strides = strides
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        block_cls = BLOCK_TYPES[block_type]
        # Tuples, not lists, of sub-layers throughout: see `_TRACKING_NOTE`.
        self.blocks = tuple(
            block_cls(
                filters,
                strides if i == 0 else 1,
                use_projection=(i == 0),
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                batch_norm_decay=batch_norm_decay,
                global_bn=global_bn,
                stochastic_depth_rate=rates[i],
                name=f"block{i + 1}",
            )
            for i in range(num_blocks)
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        _build_sequence(self.blocks, input_shape)

    def call(self, inputs, training=False):
        for block in self.blocks:
            inputs = block(inputs, training=training)
        return inputs

    def compute_output_shape(self, input_shape):
        out_filters = self.filters * BLOCK_TYPES[self.block_type].expansion
        return _strided_shape(input_shape, self.strides, out_filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            block_type=self.block_type,
            num_blocks=self.num_blocks,
            strides=self.strides,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            stochastic_depth_rates=list(self.stochastic_depth_rates),
        )
        return config


@_serializable
class Stem(keras.layers.Layer):
    """The ResNet stem; returns {'initial_conv': last conv output (pre-BN), 'initial_max_pool'}.

    - `cifar_stem`: 3x3 stride-1 conv + BN-ReLU, no max-pool (for <= 32 px inputs).
    - otherwise: 7x7 stride-2 conv, or with SK the ResNet-D stem (3x3/2 conv to
      `filters // 2`, 3x3 conv to `filters // 2`, 3x3 conv to `filters`, BN-ReLU between),
      then BN-ReLU and a 3x3 stride-2 max-pool.
    """

    def __init__(
        self,
        filters: int,
        cifar_stem: bool = False,
        sk_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.filters = filters
        self.cifar_stem = cifar_stem
        self.sk_ratio = sk_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        if cifar_stem:
            conv_specs = [(filters, 3, 1)]
        elif sk_ratio > 0:
            half = max(1, filters // 2)  # `64 * width // 2` in the original.
            conv_specs = [(half, 3, 2), (half, 3, 1), (filters, 3, 1)]
        else:
            conv_specs = [(filters, 7, 2)]
        # Alternating conv / BN-ReLU; the output of the last conv is `initial_conv`.
        stem_layers = []
        for i, (conv_filters, kernel_size, strides) in enumerate(conv_specs, start=1):
            stem_layers.append(Conv2dFixedPadding(conv_filters, kernel_size, strides, name=f"conv{i}"))
            stem_layers.append(BatchNormRelu(name=f"batch_norm{i}", **bn_args))
        self.stem_layers = tuple(stem_layers)  # see `_TRACKING_NOTE`
        self.trainable = trainable  # after the sub-layers exist, so it reaches them

    def build(self, input_shape):
        _build_sequence(self.stem_layers, input_shape)

    def call(self, inputs, training=False):
        x = inputs
        initial_conv = None
        for layer in self.stem_layers:
            if isinstance(layer, BatchNormRelu):
                initial_conv = x
                x = layer(x, training=training)
            else:
                x = layer(x)
        if not self.cifar_stem:
            x = ops.max_pool(x, pool_size=3, strides=2, padding="same")
        return {"initial_conv": initial_conv, "initial_max_pool": x}

    def compute_output_shape(self, input_shape):
        strides = 1 if self.cifar_stem else 2
        conv_shape = _strided_shape(input_shape, strides, self.filters)
        pool_shape = conv_shape if self.cifar_stem else _strided_shape(conv_shape, 2, self.filters)
        return {"initial_conv": conv_shape, "initial_max_pool": pool_shape}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            cifar_stem=self.cifar_stem,
            sk_ratio=self.sk_ratio,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
        )
        return config


@_serializable
class ResNet(keras.layers.Layer):
    """SimCLR's ResNet backbone.

    Args:
        resnet_depth: one of 10, 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck).
        width_multiplier: channel multiplier (1, 2, 3, ... or 0.25 / 0.5 for small runs).
        sk_ratio: > 0 enables selective kernels (SimCLRv2 uses 0.0625).
        se_ratio: > 0 enables squeeze-excitation.
        cifar_stem: 3x3 stride-1 stem without max-pool (for images of 32 px or less).
        batch_norm_decay, global_bn: passed to every `BatchNormRelu`.
        fine_tune_after_block: -1 trains everything; k >= 0 freezes the stem and
            block groups 1..k (4 = the whole backbone): they get `trainable=False`
            (no trainable weights, BN in inference mode, no stochastic depth) and a
            stop-gradient on their output.
        stochastic_depth_rate: > 0 drops each example's residual branches in training,
            the last block with this probability, earlier ones linearly less
            (`noise.stochastic_depth_rates`); the stem never.

    `call(images)` returns a dict with `initial_conv`, `initial_max_pool`,
    `block_group1`..`block_group4` (N, h, w, C) and `final_avg_pool` (N, C).
    """

    def __init__(
        self,
        resnet_depth: int = 50,
        width_multiplier: float = 1.0,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        cifar_stem: bool = False,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        fine_tune_after_block: int = -1,
        stochastic_depth_rate: float = 0.0,
        name: str = "resnet",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if resnet_depth not in RESNET_SPECS:
            raise ValueError(
                f"resnet_depth must be one of {sorted(RESNET_SPECS)}, got {resnet_depth}"
            )
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(
                f"fine_tune_after_block must be in [-1, 4], got {fine_tune_after_block}"
            )
        self.resnet_depth = resnet_depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.cifar_stem = cifar_stem
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.fine_tune_after_block = fine_tune_after_block
        self.stochastic_depth_rate = stochastic_depth_rate

        block_type, layers = RESNET_SPECS[resnet_depth]
        rates = stochastic_depth_rates(stochastic_depth_rate, sum(layers))
        first_block = [sum(layers[:i]) for i in range(len(layers))]
        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        self.stem = Stem(
            scaled_filters(64, width_multiplier),
            cifar_stem=cifar_stem,
            sk_ratio=sk_ratio,
            name="stem",
            **bn_args,
        )
        self.block_groups = tuple(  # see `_TRACKING_NOTE`
            BlockGroup(
                scaled_filters(64 * 2**i, width_multiplier),
                block_type,
                num_blocks,
                strides=1 if i == 0 else 2,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                stochastic_depth_rates=rates[first_block[i]:first_block[i] + num_blocks],
                name=group_name,
                **bn_args,
            )
            for i, (num_blocks, group_name) in enumerate(zip(layers, BLOCK_GROUP_NAMES))
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them
        self._freeze()

    def parts(self) -> list[keras.layers.Layer]:
        """[stem, block_group1, ..., block_group4]: the units `fine_tune_after_block` freezes."""
        # A method, not a property: `.keras` saving walks attributes, and a property
        # listing these layers again would change where their weights are stored.
        return [self.stem, *self.block_groups]

    @property
    def num_features(self) -> int:
        """Width of `final_avg_pool`."""
        group = self.block_groups[-1]
        return group.filters * BLOCK_TYPES[group.block_type].expansion

    def _freeze(self) -> None:
        # The setter propagates to existing sub-layers and variables; variables created
        # later in a frozen layer are made non-trainable by Keras, and the layers our
        # build() methods create inherit their parent's `trainable`.
        for part in self.parts()[: self.fine_tune_after_block + 1]:
            part.trainable = False

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.stem.build(shape)
        shape = self.stem.compute_output_shape(shape)["initial_max_pool"]
        _build_sequence(self.block_groups, shape)

    def call(self, inputs, training=False):
        outputs = {}
        stem_outputs = self.stem(inputs, training=training)
        frozen = self.fine_tune_after_block >= 0
        if frozen:
            stem_outputs = {k: ops.stop_gradient(v) for k, v in stem_outputs.items()}
        outputs.update(stem_outputs)
        x = stem_outputs["initial_max_pool"]
        for i, group in enumerate(self.block_groups, start=1):
            x = group(x, training=training)
            if i <= self.fine_tune_after_block:
                x = ops.stop_gradient(x)
            outputs[group.name] = x
        outputs["final_avg_pool"] = ops.mean(x, axis=(1, 2))  # (N, C)
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = dict(self.stem.compute_output_shape(input_shape))
        shape = shapes["initial_max_pool"]
        for group in self.block_groups:
            shape = group.compute_output_shape(shape)
            shapes[group.name] = shape
        shapes["final_avg_pool"] = (input_shape[0], shape[-1])
        return shapes

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            resnet_depth=self.resnet_depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            cifar_stem=self.cifar_stem,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            fine_tune_after_block=self.fine_tune_after_block,
            stochastic_depth_rate=self.stochastic_depth_rate,
        )
        return config
