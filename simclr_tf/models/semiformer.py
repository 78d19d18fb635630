"""Semiformer's two-branch network (Weng et al., ECCV 2022): a ResNet and a ViT run in lockstep.

A conv branch (this repo's `ResNet`: its stem and four block groups) and a transformer
branch (`VisionTransformer`: its patch embedding and blocks, a quarter of them a stage)
run side by side over 4 stages; after stage k each branch receives the other's features
through a fusion module, in the spirit of Conformer's Feature Coupling Unit (FCU):

  conv -> transformer (`ConvToTokens`, FCUDown): 1x1 conv to the token width, average-
      pooled (or repeated) to the patch grid, LayerNorm, GELU; added to the patch tokens
      (the class token gets nothing);
  transformer -> conv (`TokensToConv`, FCUUp): the patch tokens (class token left out)
      as a (grid, grid) map, 1x1 conv to the channel count, BatchNorm, repeated (or
      average-pooled) to the feature map's size; added to the feature map.

A stage, in Conformer's order (ConvTransBlock.forward): x = block_group_k(x);
t = blocks_k(t + down_k(x)); x = x + up_k(t). Heads: `logits_sup_conv` on the conv
branch's pooled features (through the SimCLR projection layers below --ft_proj_selector,
as `SimCLRModel`'s classifier), `logits_sup_transformer` on the ViT's pooled, normalised
representation, and `logits_sup` = their mean: the reference's fused accuracy scores
`conv_logits + transformer_logits` (semi_engine_concat_evalVersion.py `evaluate`, "acc1"),
whose argmax is the mean's. `final_avg_pool` (k-NN, linear probe) is the conv branch's
pooled features: the pseudo-labelling branch, and the features a ResNet `SimCLRModel` of
the same flags has; `final_avg_pool_transformer` is the other branch's.

Checkpoints: the conv branch's layers have `SimCLRModel`'s attribute names (`backbone`,
`projection_head`, `supervised_head`), so a ResNet run of this repo (pretrain, finetune,
supervised) restores into the conv branch by object path; the transformer branch, the
fusion modules and the transformer head are then freshly initialised (the restore lists
them). With `zero_init_fusion` (default) the fusion modules' norms start at zero, so an
initialised conv branch first computes exactly what the ResNet it came from computed.

Departures from Conformer/Semiformer (reference: wengzejia1/Semiformer semiformer.py):
fusion at the 4 stage boundaries instead of around every transformer block; the ViT
embeds the image itself (Conformer's patch embedding reads the conv stem's output); the
transformer -> conv term is added to the stage's output rather than inside the next
bottleneck's first conv, and has no ReLU (so a zero-initialised BN can learn); the class
token is not added to itself (FCUDown concatenates it into a term added to the tokens).

Example:
    model = SemiformerModel(10, resnet_depth=18, width_multiplier=0.25, cifar_stem=True,
                            vit_size="tiny", patch_size=4)
    model.build((None, 32, 32, 3))
    out = model(images, training=True)
    out["logits_sup_conv"], out["logits_sup_transformer"], out["logits_sup"]  # (N, 10) each
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import BLOCK_GROUP_NAMES, BLOCK_TYPES, BatchNormRelu, Conv2dFixedPadding, ResNet
from simclr_tf.models.vit import VIT_SIZES, VisionTransformer

BRANCHES = ("conv", "transformer")


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="simclr_tf")(cls)


def conv_map_sides(image_size: int, cifar_stem: bool) -> tuple[int, int, int, int]:
    """Side of the conv branch's feature map after each block group (square images)."""
    side = image_size if cifar_stem else math.ceil(math.ceil(image_size / 2) / 2)  # stem conv /2, max-pool /2
    sides = []
    for strides in (1, 2, 2, 2):
        side = math.ceil(side / strides)
        sides.append(side)
    return tuple(sides)


def fusion_problem(image_size: int, patch_size: int, cifar_stem: bool) -> str | None:
    """Why the two branches cannot be fused at this size (None: they can)."""
    if patch_size < 1 or image_size % patch_size:
        return f"--patch_size={patch_size} does not divide --image_size={image_size}."
    grid = image_size // patch_size
    for k, side in enumerate(conv_map_sides(image_size, cifar_stem), start=1):
        if side % grid and grid % side:
            return (
                f"block_group{k}'s {side}x{side} feature map and the {grid}x{grid} patch grid: "
                "neither side divides the other, so the fusion cannot pool or repeat one onto the "
                "other; pick --patch_size so that image_size / patch_size is a power of 2 (4 at 32 px)."
            )
    return None


def resample(x, size: tuple[int, int]):
    """(N, h, w, C) -> (N, H, W, C): average pooling when H, W divide h, w; repetition when h, w divide H, W."""
    (h, w), (height, width) = x.shape[1:3], size
    if (h, w) == (height, width):
        return x
    if h % height == 0 and w % width == 0:
        window = (h // height, w // width)
        return ops.average_pool(x, window, strides=window, padding="valid")
    if height % h == 0 and width % w == 0:
        return ops.repeat(ops.repeat(x, height // h, axis=1), width // w, axis=2)
    raise ValueError(f"cannot resample a {h}x{w} map to {height}x{width}: neither divides the other")


@_serializable
class ConvToTokens(keras.layers.Layer):
    """FCUDown: a conv feature map -> one term per patch token, (N, h, w, C) -> (N, gh * gw, D).

    1x1 conv (with bias) to `hidden_dim`, resampled to the patch grid, LayerNorm, GELU.
    `zero_init`: the LayerNorm's scale starts at 0, so the term starts at 0.
    """

    def __init__(self, hidden_dim: int, zero_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.zero_init = zero_init
        self.projection = keras.layers.Conv2D(hidden_dim, 1, name="projection")
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, gamma_initializer="zeros" if zero_init else "ones", name="layer_norm"
        )

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.layer_norm.build((input_shape[0], None, self.hidden_dim))

    def call(self, features, grid: tuple[int, int]):
        x = resample(self.projection(features), grid)  # (N, gh, gw, D)
        x = ops.reshape(x, (ops.shape(x)[0], grid[0] * grid[1], self.hidden_dim))
        return ops.gelu(self.layer_norm(x), approximate=False)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, zero_init=self.zero_init)
        return config


@_serializable
class TokensToConv(keras.layers.Layer):
    """FCUUp: patch tokens -> a term for a conv feature map, (N, gh * gw, D) -> (N, h, w, C).

    The tokens as a (gh, gw) map, 1x1 conv (no bias: BN follows) to `channels`, BatchNorm,
    resampled to the feature map's size. `zero_init`: the BN's scale starts at 0.
    """

    def __init__(
        self, channels: int, zero_init: bool = True, batch_norm_decay: float = 0.9, global_bn: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.zero_init = zero_init
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.projection = Conv2dFixedPadding(channels, 1, 1, name="projection")
        self.batch_norm = BatchNormRelu(
            relu=False, init_zero=zero_init, batch_norm_decay=batch_norm_decay, global_bn=global_bn, name="batch_norm"
        )

    def build(self, input_shape):
        self.projection.build((input_shape[0], None, None, input_shape[-1]))
        self.batch_norm.build((input_shape[0], None, None, self.channels))

    def call(self, tokens, grid: tuple[int, int], size: tuple[int, int], training=False):
        x = ops.reshape(tokens, (ops.shape(tokens)[0], grid[0], grid[1], tokens.shape[-1]))
        x = self.batch_norm(self.projection(x), training=training)  # (N, gh, gw, C)
        return resample(x, size)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            channels=self.channels, zero_init=self.zero_init,
            batch_norm_decay=self.batch_norm_decay, global_bn=self.global_bn,
        )
        return config


@_serializable
class SemiformerModel(keras.Model):
    """ResNet and ViT branches coupled at every stage; `call` returns a dict of named outputs.

    Args:
        num_classes: classes of both heads.
        resnet_depth, width_multiplier, sk_ratio, se_ratio, cifar_stem: the conv branch.
        vit_size, patch_size, vit_pooling: the transformer branch (`VIT_SIZES`; "token"/"mean").
        batch_norm_decay, global_bn: every batch norm (global_bn: cross-replica).
        proj_head_mode, proj_out_dim, num_proj_layers, ft_proj_selector: the SimCLR
            projection layers below the conv head's input (only those are built), so a
            fine-tuned ResNet's classifier restores into the conv branch.
        stop_gradient_to_supervised_head: no gradient from the heads into the branches.
        fine_tune_after_block: only -1 (everything trains); kept for the export's overrides.
        zero_init_logits_layer: zero-initialise both heads' kernels.
        stochastic_depth_rate: both branches' (see `ResNet`, `VisionTransformer`).
        zero_init_fusion: the fusion modules' norms start at 0 (each branch starts alone).

    Outputs of `call(images, training)`: `initial_conv`, `initial_max_pool`,
    `patch_embedding`, `block_group1..4` (conv, after fusion), `transformer_block_group1..4`
    (tokens, after the stage's blocks), `final_avg_pool` (N, F) and
    `final_avg_pool_transformer` (N, D), `supervised_head_input`, `logits_sup_conv`,
    `logits_sup_transformer` and `logits_sup` (their mean), (N, num_classes) each.
    """

    def __init__(
        self,
        num_classes: int,
        resnet_depth: int = 50,
        width_multiplier: float = 1.0,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        cifar_stem: bool = False,
        vit_size: str = "tiny",
        patch_size: int = 16,
        vit_pooling: str = "token",
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        proj_head_mode: str = "nonlinear",
        proj_out_dim: int = 128,
        num_proj_layers: int = 3,
        ft_proj_selector: int = 0,
        stop_gradient_to_supervised_head: bool = False,
        fine_tune_after_block: int = -1,
        zero_init_logits_layer: bool = False,
        stochastic_depth_rate: float = 0.0,
        zero_init_fusion: bool = True,
        name: str = "semiformer_model",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if vit_size not in VIT_SIZES:
            raise ValueError(f"vit_size must be one of {sorted(VIT_SIZES)}, got {vit_size!r}")
        if fine_tune_after_block != -1:
            raise ValueError(f"fine_tune_after_block must be -1 (every part trains), got {fine_tune_after_block}")
        self.num_classes = num_classes
        self.resnet_depth = resnet_depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.cifar_stem = cifar_stem
        self.vit_size = vit_size
        self.patch_size = patch_size
        self.vit_pooling = vit_pooling
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.proj_head_mode = proj_head_mode
        self.proj_out_dim = proj_out_dim
        self.num_proj_layers = num_proj_layers
        self.ft_proj_selector = ft_proj_selector
        self.stop_gradient_to_supervised_head = stop_gradient_to_supervised_head
        self.fine_tune_after_block = fine_tune_after_block
        self.zero_init_logits_layer = zero_init_logits_layer
        self.stochastic_depth_rate = stochastic_depth_rate
        self.zero_init_fusion = zero_init_fusion

        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        # Conv branch: SimCLRModel's attribute names, so its checkpoints restore by path.
        self.backbone = ResNet(
            resnet_depth=resnet_depth, width_multiplier=width_multiplier, sk_ratio=sk_ratio, se_ratio=se_ratio,
            cifar_stem=cifar_stem, stochastic_depth_rate=stochastic_depth_rate, name="resnet", **bn_args,
        )
        self.projection_head = ProjectionHead(
            mode=proj_head_mode, out_dim=proj_out_dim, num_layers=num_proj_layers, ft_proj_selector=ft_proj_selector,
            drop_unused_layers=True, name="projection_head", **bn_args,
        )
        self.supervised_head = SupervisedHead(num_classes, zero_init=zero_init_logits_layer, name="head_supervised")
        size = VIT_SIZES[vit_size]
        self.transformer = VisionTransformer(
            hidden_dim=size.hidden_dim, num_layers=size.num_layers, num_heads=size.num_heads, mlp_dim=size.mlp_dim,
            patch_size=patch_size, pooling=vit_pooling, stochastic_depth_rate=stochastic_depth_rate, name="vit",
        )
        # "head_supervised" in the name: LARS and the L2 loss treat it as the conv head.
        self.transformer_head = SupervisedHead(
            num_classes, zero_init=zero_init_logits_layer, name="head_supervised_transformer"
        )
        # Tuples, not lists: see resnet._TRACKING_NOTE.
        self.conv_to_transformer = tuple(
            ConvToTokens(size.hidden_dim, zero_init=zero_init_fusion, name=f"fusion_conv_to_transformer{k}")
            for k in range(1, 5)
        )
        self.transformer_to_conv = tuple(
            TokensToConv(
                group.filters * BLOCK_TYPES[group.block_type].expansion, zero_init=zero_init_fusion,
                name=f"fusion_transformer_to_conv{k}", **bn_args,
            )
            for k, group in enumerate(self.backbone.block_groups, start=1)
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them
        if self.dtype_policy.variable_dtype != "float32":
            raise ValueError(
                f"dtype {self.dtype_policy.name!r}: SemiformerModel keeps float32 variables; use "
                "float32, mixed_bfloat16 or mixed_float16."
            )

    @property
    def image_input_shape(self) -> tuple:
        """(None, H, W, 3): the image size the model was built for (the ViT's position embeddings fix it)."""
        return (None, *self._built_image_hw, 3)

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        if height != width:
            raise ValueError(f"SemiformerModel takes square images, got {height}x{width}")
        problem = fusion_problem(height, self.patch_size, self.cifar_stem)
        if problem:
            raise ValueError(problem)
        self._built_image_hw = (height, width)
        self._grid = (height // self.patch_size,) * 2
        self._stage_sides = conv_map_sides(height, self.cifar_stem)
        self.backbone.build(input_shape)
        shapes = self.backbone.compute_output_shape(input_shape)
        assert tuple(shapes[name][1] for name in BLOCK_GROUP_NAMES) == self._stage_sides, shapes
        self.transformer.build(input_shape)
        tokens = self.transformer.patch_embedding.compute_output_shape(tuple(input_shape))
        for name, down, up in zip(BLOCK_GROUP_NAMES, self.conv_to_transformer, self.transformer_to_conv):
            down.build(shapes[name])
            up.build(tokens)
        features = shapes["final_avg_pool"]
        self.projection_head.build(features)
        self.supervised_head.build(self.projection_head.supervised_input_shape(features))
        self.transformer_head.build((input_shape[0], self.transformer.hidden_dim))
        # As SimCLRModel: Keras hands the model's dtype policy (e.g. mixed_bfloat16) to
        # none of the layers it holds, so share it with all of them.
        for layer in self._flatten_layers(include_self=False):
            layer.dtype_policy = self.dtype_policy

    def call(self, images, training=False):
        resnet, vit = self.backbone, self.transformer
        stem = resnet.stem(images, training=training)
        outputs = dict(stem)
        x = stem["initial_max_pool"]  # (N, h, w, C)
        t = vit.patch_embedding(images)  # (N, T, D), T = [1 +] gh * gw
        outputs["patch_embedding"] = t
        has_class_token = vit.pooling == "token"
        first = 0
        for k, (group, end) in enumerate(zip(resnet.block_groups, vit.group_ends)):
            x = group(x, training=training)
            down = self.conv_to_transformer[k](x, grid=self._grid)  # (N, gh * gw, D)
            if has_class_token:
                down = ops.pad(down, ((0, 0), (1, 0), (0, 0)))  # nothing for the class token
            t = t + ops.cast(down, t.dtype)
            for block in vit.blocks[first:end]:
                t = block(t, training=training)
            first = end
            patches = t[:, 1:] if has_class_token else t
            side = self._stage_sides[k]
            x = x + ops.cast(self.transformer_to_conv[k](patches, grid=self._grid, size=(side, side), training=training), x.dtype)
            outputs[BLOCK_GROUP_NAMES[k]] = x
            outputs[f"transformer_{BLOCK_GROUP_NAMES[k]}"] = t
        features = ops.mean(x, axis=(1, 2))  # (N, F)
        tokens = vit.final_norm(t)
        pooled = tokens[:, 0] if has_class_token else ops.mean(tokens, axis=1)  # (N, D)
        _, hiddens = self.projection_head(features, training=training)
        head_input = hiddens[self.projection_head.selected_index]
        if self.stop_gradient_to_supervised_head:
            head_input, pooled_input = ops.stop_gradient(head_input), ops.stop_gradient(pooled)
        else:
            pooled_input = pooled
        conv_logits = self.supervised_head(head_input, training=training)
        transformer_logits = self.transformer_head(pooled_input, training=training)
        outputs.update(
            final_avg_pool=features,
            final_avg_pool_transformer=pooled,
            supervised_head_input=head_input,
            logits_sup_conv=conv_logits,
            logits_sup_transformer=transformer_logits,
            logits_sup=(conv_logits + transformer_logits) / 2,
        )
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            resnet_depth=self.resnet_depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            cifar_stem=self.cifar_stem,
            vit_size=self.vit_size,
            patch_size=self.patch_size,
            vit_pooling=self.vit_pooling,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            proj_head_mode=self.proj_head_mode,
            proj_out_dim=self.proj_out_dim,
            num_proj_layers=self.num_proj_layers,
            ft_proj_selector=self.ft_proj_selector,
            stop_gradient_to_supervised_head=self.stop_gradient_to_supervised_head,
            fine_tune_after_block=self.fine_tune_after_block,
            zero_init_logits_layer=self.zero_init_logits_layer,
            stochastic_depth_rate=self.stochastic_depth_rate,
            zero_init_fusion=self.zero_init_fusion,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SemiformerModel":
        return cls(**config)


def build_semiformer(
    config, *, num_classes: int, global_bn: bool | None = None, dtype: str | None = None
) -> SemiformerModel:
    """A `SemiformerModel` from a `ModelConfig`, built for `config.image_size` inputs.

    Call inside `strategy.scope()` when distributing; `global_bn=None` uses
    `config.global_bn`, `dtype` is the Keras dtype policy (None: the global one).
    """
    model = SemiformerModel(
        num_classes,
        resnet_depth=config.resnet_depth,
        width_multiplier=config.width_multiplier,
        sk_ratio=config.sk_ratio,
        se_ratio=config.se_ratio,
        cifar_stem=config.cifar_stem,
        vit_size=config.vit_size,
        patch_size=config.patch_size,
        vit_pooling=config.vit_pooling,
        batch_norm_decay=config.batch_norm_decay,
        global_bn=config.global_bn if global_bn is None else global_bn,
        proj_head_mode=config.proj_head_mode,
        proj_out_dim=config.proj_out_dim,
        num_proj_layers=config.num_proj_layers,
        ft_proj_selector=config.ft_proj_selector,
        zero_init_logits_layer=config.zero_init_logits_layer,
        stochastic_depth_rate=config.stochastic_depth_rate,
        dtype=dtype,
    )
    model.build((None, config.image_size, config.image_size, 3))
    return model
