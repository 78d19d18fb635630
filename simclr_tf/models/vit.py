"""Vision Transformer backbone (Dosovitskiy et al. 2021; DeiT sizes), for `--backbone=vit`.

Written here rather than taken from keras_hub: keras_hub's `ViTBackbone` has no stochastic
depth (Noisy Student's and DeiT's noise) and keras_hub 0.32 requires tensorflow-text, which
requires the full `tensorflow` wheel (not `tensorflow-cpu`). The attention, dense and
layer-norm layers are Keras' own.

Pre-norm encoder blocks: x += DropPath(MHA(LN(x))); x += DropPath(MLP(LN(x))), GELU MLP,
LayerNorm epsilon 1e-6, truncated-normal(0.02) init, learned position embeddings, and a
final LayerNorm. `pooling="token"` prepends a class token and reads it; "mean" averages
the patch tokens (no class token). Outputs use the ResNet's names where they make sense,
so heads, methods and `--fine_tune_after_block` work unchanged:
  patch_embedding (N, T, D), block_group1..4 (N, T, D: after each quarter of the blocks),
  final_avg_pool (N, D): the pooled, normalised representation the heads read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import ops

from simclr_tf.models.noise import RandomDrop, stochastic_depth_rates

GROUP_NAMES = ("block_group1", "block_group2", "block_group3", "block_group4")
POOLINGS = ("token", "mean")


@dataclasses.dataclass(frozen=True)
class VitSize:
    hidden_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int


# DeiT's Tiny and Small, ViT's (and DeiT's) Base.
VIT_SIZES = {
    "tiny": VitSize(hidden_dim=192, num_layers=12, num_heads=3, mlp_dim=768),
    "small": VitSize(hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "base": VitSize(hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
}


def _init():
    return keras.initializers.TruncatedNormal(stddev=0.02)


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="simclr_tf")(cls)


@_serializable
class PatchEmbedding(keras.layers.Layer):
    """Non-overlapping patches -> linear embedding (+ class token) + position embedding."""

    def __init__(self, hidden_dim: int, patch_size: int, class_token: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.patch_size = patch_size
        self.class_token = class_token
        self.projection = keras.layers.Conv2D(
            hidden_dim, patch_size, strides=patch_size, kernel_initializer=_init(), name="projection"
        )

    def _num_patches(self, input_shape) -> int:
        height, width = input_shape[1], input_shape[2]
        if height is None or width is None or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch_size {self.patch_size}: "
                "use --patch_size 4 for 32 px images, 16 for 224 px."
            )
        return (height // self.patch_size) * (width // self.patch_size)

    def build(self, input_shape):
        self.projection.build(input_shape)
        tokens = self._num_patches(input_shape) + int(self.class_token)
        if self.class_token:
            self.cls = self.add_weight(shape=(1, 1, self.hidden_dim), initializer=_init(), name="class_token")
        self.position = self.add_weight(
            shape=(1, tokens, self.hidden_dim), initializer=_init(), name="position_embedding"
        )

    def call(self, images):
        patches = self.projection(images)  # (N, h, w, D)
        patches = ops.reshape(patches, (ops.shape(patches)[0], -1, self.hidden_dim))
        if self.class_token:
            cls = ops.broadcast_to(ops.cast(self.cls, patches.dtype), (ops.shape(patches)[0], 1, self.hidden_dim))
            patches = ops.concatenate([cls, patches], axis=1)
        return patches + ops.cast(self.position, patches.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self._num_patches(input_shape) + int(self.class_token), self.hidden_dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, patch_size=self.patch_size, class_token=self.class_token)
        return config


@_serializable
class EncoderBlock(keras.layers.Layer):
    """Pre-norm transformer block; each residual branch dropped per example at `drop_path_rate`."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int, drop_path_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.drop_path_rate = drop_path_rate
        self.layer_norm_1 = keras.layers.LayerNormalization(epsilon=1e-6, name="layer_norm_1")
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, kernel_initializer=_init(), name="attention"
        )
        self.layer_norm_2 = keras.layers.LayerNormalization(epsilon=1e-6, name="layer_norm_2")
        self.mlp_in = keras.layers.Dense(mlp_dim, activation="gelu", kernel_initializer=_init(), name="mlp_in")
        self.mlp_out = keras.layers.Dense(hidden_dim, kernel_initializer=_init(), name="mlp_out")
        # Two layers, so the two branches draw independent masks.
        self.drop_attention = self.drop_mlp = None
        if drop_path_rate > 0:
            self.drop_attention = RandomDrop(drop_path_rate, per_example=True, name="drop_path_attention")
            self.drop_mlp = RandomDrop(drop_path_rate, per_example=True, name="drop_path_mlp")

    def build(self, input_shape):
        self.layer_norm_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.layer_norm_2.build(input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_dim))

    def call(self, x, training=False):
        y = self.layer_norm_1(x)
        y = self.attention(y, y, training=training)
        if self.drop_attention is not None:
            y = self.drop_attention(y, training=training)
        x = x + y
        y = self.mlp_out(self.mlp_in(self.layer_norm_2(x)))
        if self.drop_mlp is not None:
            y = self.drop_mlp(y, training=training)
        return x + y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            drop_path_rate=self.drop_path_rate,
        )
        return config


@_serializable
class VisionTransformer(keras.layers.Layer):
    """ViT backbone; `call(images)` returns the dict described in the module docstring.

    Args:
        hidden_dim, num_layers, num_heads, mlp_dim: the size (see `VIT_SIZES`).
        patch_size: side of the square patches (4 for 32 px images, 16 for 224 px).
        pooling: "token" (class token) or "mean" (average of the patch tokens).
        fine_tune_after_block: -1 trains everything; 0 freezes the patch embedding; k in
            1..4 also the first k quarters of the blocks (4: the whole backbone), as the
            ResNet's block groups.
        stochastic_depth_rate: the last block's drop rate; earlier blocks linearly less.
    """

    def __init__(
        self,
        hidden_dim: int = 192,
        num_layers: int = 12,
        num_heads: int = 3,
        mlp_dim: int = 768,
        patch_size: int = 16,
        pooling: str = "token",
        fine_tune_after_block: int = -1,
        stochastic_depth_rate: float = 0.0,
        name: str = "vit",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_layers < 4:  # each quarter (block_group1..4) needs a block
            raise ValueError(f"num_layers must be >= 4, got {num_layers}")
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(f"fine_tune_after_block must be in [-1, 4], got {fine_tune_after_block}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.patch_size = patch_size
        self.pooling = pooling
        self.fine_tune_after_block = fine_tune_after_block
        self.stochastic_depth_rate = stochastic_depth_rate
        self.patch_embedding = PatchEmbedding(
            hidden_dim, patch_size, class_token=pooling == "token", name="patch_embedding"
        )
        rates = stochastic_depth_rates(stochastic_depth_rate, num_layers)
        self.blocks = tuple(
            EncoderBlock(hidden_dim, num_heads, mlp_dim, drop_path_rate=rates[i], name=f"block{i + 1}")
            for i in range(num_layers)
        )
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="layer_norm_final")
        self.trainable = trainable
        self._freeze()

    @property
    def group_ends(self) -> tuple[int, ...]:
        """Blocks done after each quarter: (3, 6, 9, 12) for 12 blocks."""
        return tuple(round(self.num_layers * k / 4) for k in range(1, 5))

    @property
    def num_features(self) -> int:
        return self.hidden_dim

    def parts(self) -> list[keras.layers.Layer]:
        """[patch_embedding, block1, ..., blockL, final_norm] in order."""
        return [self.patch_embedding, *self.blocks, self.final_norm]

    def _frozen_parts(self) -> int:
        # Freezing the last quarter freezes the final norm too: the whole backbone.
        if self.fine_tune_after_block < 0:
            return 0
        if self.fine_tune_after_block == 0:
            return 1
        if self.fine_tune_after_block == 4:
            return len(self.parts())
        return 1 + self.group_ends[self.fine_tune_after_block - 1]

    def _freeze(self) -> None:
        for layer in self.parts()[: self._frozen_parts()]:
            layer.trainable = False
            # Re-setting `trainable` to the value a layer already has does not reach the
            # sub-layers MultiHeadAttention creates in its build(): mark their variables.
            for variable in layer.weights:
                variable.trainable = False

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.patch_embedding.build(shape)
        tokens = self.patch_embedding.compute_output_shape(shape)
        for block in self.blocks:
            block.build(tokens)
        self.final_norm.build(tokens)
        self._freeze()  # again: MultiHeadAttention creates its sub-layers in build()

    def call(self, images, training=False):
        frozen = self._frozen_parts()
        x = self.patch_embedding(images)
        if frozen >= 1:
            x = ops.stop_gradient(x)
        outputs = {"patch_embedding": x}
        ends = dict(zip(self.group_ends, GROUP_NAMES))
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, training=training)
            if frozen >= i + 1:
                x = ops.stop_gradient(x)
            if i in ends:
                outputs[ends[i]] = x
        x = self.final_norm(x)
        pooled = x[:, 0] if self.pooling == "token" else ops.mean(x, axis=1)
        if frozen == len(self.parts()):
            pooled = ops.stop_gradient(pooled)
        outputs["final_avg_pool"] = pooled
        return outputs

    def compute_output_shape(self, input_shape):
        tokens = self.patch_embedding.compute_output_shape(tuple(input_shape))
        shapes = {"patch_embedding": tokens, **{name: tokens for name in GROUP_NAMES}}
        shapes["final_avg_pool"] = (input_shape[0], self.hidden_dim)
        return shapes

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            patch_size=self.patch_size,
            pooling=self.pooling,
            fine_tune_after_block=self.fine_tune_after_block,
            stochastic_depth_rate=self.stochastic_depth_rate,
        )
        return config
