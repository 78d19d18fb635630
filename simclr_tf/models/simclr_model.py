"""SimCLRModel: ResNet or ViT backbone + projection head + optional supervised head.

One model for pretraining, fine-tuning and distillation: the trainer picks outputs
from the returned dict; there is no `train_mode` switch inside the model.

Example:
    model = SimCLRModel(num_classes=10, resnet_depth=18, width_multiplier=0.25,
                        cifar_stem=True, stop_gradient_to_supervised_head=True)
    model.build((None, 32, 32, 3))
    out = model(images, training=True)  # images: (2B, 32, 32, 3) in [0, 1]
    out["proj_head_output"]  # (2B, 128) -> contrastive loss
    out["logits_sup"]        # (2B, 10)  -> linear-eval loss, no gradient into the backbone
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras
from keras import ops

from simclr_tf.config import ModelConfig
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.noise import RandomDrop
from simclr_tf.models.resnet import BLOCK_GROUP_NAMES, ResNet
from simclr_tf.models.vit import VIT_SIZES, VisionTransformer

BACKBONES = ("resnet", "vit")

OUTPUT_KEYS = (
    "initial_conv",
    "initial_max_pool",
    *BLOCK_GROUP_NAMES,
    "final_avg_pool",
    "proj_head_input",
    "proj_head_output",
    "supervised_head_input",
)  # plus "logits_sup" when the model has a supervised head; a ViT has "patch_embedding"
# instead of "initial_conv" and "initial_max_pool" (see simclr_tf.models.vit).


@keras.saving.register_keras_serializable(package="simclr_tf")
class SimCLRModel(keras.Model):
    """ResNet or ViT + projection head (+ supervised head); `call` returns a dict of named outputs.

    Args:
        num_classes: classes of the supervised head; None for no supervised head.
        backbone: "resnet" or "vit".
        resnet_depth, width_multiplier, sk_ratio, se_ratio, cifar_stem: the ResNet.
        vit_size, patch_size, vit_pooling: the ViT (`VIT_SIZES`; "token" or "mean").
        batch_norm_decay, global_bn: every batch norm (global_bn: cross-replica).
        proj_head_mode, proj_out_dim, num_proj_layers, ft_proj_selector: the projection
            head; the supervised head reads projection hidden `ft_proj_selector`.
        stop_gradient_to_supervised_head: stop gradients from the supervised head into
            the backbone and projection head (linear evaluation during pretraining).
        drop_unused_projection_layers: build only the projection layers below the
            supervised head's input (fine-tuning and distillation, as the paper).
        fine_tune_after_block: -1 trains everything; 0 freezes the stem; k in 1..3 the
            stem and block_group1..k; 4 the whole backbone.
        zero_init_logits_layer: zero-initialise the supervised head's kernel.
        dropout_rate: dropout on the supervised head's input in training (Noisy
            Student's student noise); 0: none.
        stochastic_depth_rate: see `ResNet`; 0: none.

    Outputs of `call(images, training)`: see `OUTPUT_KEYS`, plus `logits_sup`.
    """

    def __init__(
        self,
        num_classes: int | None,
        resnet_depth: int = 50,
        width_multiplier: float = 1.0,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        cifar_stem: bool = False,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        proj_head_mode: str = "nonlinear",
        proj_out_dim: int = 128,
        num_proj_layers: int = 3,
        ft_proj_selector: int = 0,
        stop_gradient_to_supervised_head: bool = False,
        fine_tune_after_block: int = -1,
        zero_init_logits_layer: bool = False,
        drop_unused_projection_layers: bool = False,
        dropout_rate: float = 0.0,
        stochastic_depth_rate: float = 0.0,
        backbone: str = "resnet",
        vit_size: str = "tiny",
        patch_size: int = 16,
        vit_pooling: str = "token",
        name: str = "simclr_model",
        **kwargs,
    ):
        trainable = kwargs.pop("trainable", True)
        super().__init__(name=name, **kwargs)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(
                f"fine_tune_after_block must be in [-1, 4] (-1: train everything, "
                f"4: freeze the whole backbone), got {fine_tune_after_block}"
            )
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if backbone == "vit" and vit_size not in VIT_SIZES:
            raise ValueError(f"vit_size must be one of {sorted(VIT_SIZES)}, got {vit_size!r}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.vit_size = vit_size
        self.patch_size = patch_size
        self.vit_pooling = vit_pooling
        self.resnet_depth = resnet_depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.cifar_stem = cifar_stem
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.proj_head_mode = proj_head_mode
        self.proj_out_dim = proj_out_dim
        self.num_proj_layers = num_proj_layers
        self.ft_proj_selector = ft_proj_selector
        self.stop_gradient_to_supervised_head = stop_gradient_to_supervised_head
        self.fine_tune_after_block = fine_tune_after_block
        self.zero_init_logits_layer = zero_init_logits_layer
        self.drop_unused_projection_layers = drop_unused_projection_layers
        self.dropout_rate = dropout_rate
        self.stochastic_depth_rate = stochastic_depth_rate

        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        if backbone == "vit":
            size = VIT_SIZES[vit_size]
            self.backbone = VisionTransformer(
                hidden_dim=size.hidden_dim,
                num_layers=size.num_layers,
                num_heads=size.num_heads,
                mlp_dim=size.mlp_dim,
                patch_size=patch_size,
                pooling=vit_pooling,
                fine_tune_after_block=fine_tune_after_block,
                stochastic_depth_rate=stochastic_depth_rate,
                name="vit",
            )
        else:
            self.backbone = ResNet(
                resnet_depth=resnet_depth,
                width_multiplier=width_multiplier,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                cifar_stem=cifar_stem,
                fine_tune_after_block=fine_tune_after_block,
                stochastic_depth_rate=stochastic_depth_rate,
                name="resnet",
                **bn_args,
            )
        self.projection_head = ProjectionHead(
            mode=proj_head_mode,
            out_dim=proj_out_dim,
            num_layers=num_proj_layers,
            ft_proj_selector=ft_proj_selector,
            drop_unused_layers=drop_unused_projection_layers,
            name="projection_head",
            **bn_args,
        )
        self.supervised_head = (
            SupervisedHead(num_classes, zero_init=zero_init_logits_layer, name="head_supervised")
            if num_classes is not None
            else None
        )
        self.dropout = (
            RandomDrop(dropout_rate, name="dropout")
            if dropout_rate > 0 and num_classes is not None
            else None
        )
        self.trainable = trainable  # after the sub-layers exist, so it reaches them
        if self.dtype_policy.variable_dtype != "float32":
            raise ValueError(
                f"dtype {self.dtype_policy.name!r}: SimCLRModel keeps float32 variables; use "
                "float32, mixed_bfloat16 or mixed_float16."
            )

    @property
    def image_input_shape(self) -> tuple:
        """(None, H, W, 3) the model accepts: any H, W for a ResNet; a ViT's, from its build."""
        if self.backbone_name == "vit":
            return (None, *self._built_image_hw, 3)
        return (None, None, None, 3)

    def build(self, input_shape):
        self._built_image_hw = tuple(input_shape[1:3])
        self.backbone.build(input_shape)
        features_shape = self.backbone.compute_output_shape(input_shape)["final_avg_pool"]
        self.projection_head.build(features_shape)
        if self.supervised_head is not None:
            self.supervised_head.build(self.projection_head.supervised_input_shape(features_shape))
        # Keras hands a layer's dtype policy to none of the layers it creates, so share
        # ours (e.g. dtype="mixed_bfloat16") with all of them, including those created in
        # build(). Only the compute dtype can differ: variables are float32 (see __init__).
        for layer in self._flatten_layers(include_self=False):
            layer.dtype_policy = self.dtype_policy

    def call(self, images, training=False):
        outputs = dict(self.backbone(images, training=training))
        features = outputs["final_avg_pool"]  # (N, C)
        proj_output, hiddens = self.projection_head(features, training=training)
        supervised_input = hiddens[self.projection_head.selected_index]
        if self.stop_gradient_to_supervised_head:
            supervised_input = ops.stop_gradient(supervised_input)
        outputs["proj_head_input"] = features
        outputs["proj_head_output"] = proj_output  # (N, proj_out_dim), or (N, C) for 'none'
        outputs["supervised_head_input"] = supervised_input
        if self.supervised_head is not None:
            if self.dropout is not None:
                supervised_input = self.dropout(supervised_input, training=training)
            outputs["logits_sup"] = self.supervised_head(supervised_input, training=training)
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            backbone=self.backbone_name,
            vit_size=self.vit_size,
            patch_size=self.patch_size,
            vit_pooling=self.vit_pooling,
            resnet_depth=self.resnet_depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            cifar_stem=self.cifar_stem,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
            proj_head_mode=self.proj_head_mode,
            proj_out_dim=self.proj_out_dim,
            num_proj_layers=self.num_proj_layers,
            ft_proj_selector=self.ft_proj_selector,
            stop_gradient_to_supervised_head=self.stop_gradient_to_supervised_head,
            fine_tune_after_block=self.fine_tune_after_block,
            zero_init_logits_layer=self.zero_init_logits_layer,
            drop_unused_projection_layers=self.drop_unused_projection_layers,
            dropout_rate=self.dropout_rate,
            stochastic_depth_rate=self.stochastic_depth_rate,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SimCLRModel":
        return cls(**config)


def build_model(
    config: ModelConfig,
    *,
    num_classes: int | None,
    stop_gradient_to_supervised_head: bool = False,
    global_bn: bool | None = None,
    drop_unused_projection_layers: bool = False,
    dtype: str | None = None,
) -> SimCLRModel:
    """A `SimCLRModel` from a `ModelConfig`, built for `config.image_size` inputs.

    Variables are created here, so call it inside `strategy.scope()` when distributing.
    `global_bn=None` uses `config.global_bn`. `dtype` is the Keras dtype policy, e.g.
    "mixed_bfloat16" (None: Keras's global policy, float32 unless changed).
    """
    model = SimCLRModel(
        num_classes,
        resnet_depth=config.resnet_depth,
        width_multiplier=config.width_multiplier,
        sk_ratio=config.sk_ratio,
        se_ratio=config.se_ratio,
        cifar_stem=config.cifar_stem,
        batch_norm_decay=config.batch_norm_decay,
        global_bn=config.global_bn if global_bn is None else global_bn,
        proj_head_mode=config.proj_head_mode,
        proj_out_dim=config.proj_out_dim,
        num_proj_layers=config.num_proj_layers,
        ft_proj_selector=config.ft_proj_selector,
        stop_gradient_to_supervised_head=stop_gradient_to_supervised_head,
        fine_tune_after_block=config.fine_tune_after_block,
        zero_init_logits_layer=config.zero_init_logits_layer,
        drop_unused_projection_layers=drop_unused_projection_layers,
        dropout_rate=config.dropout_rate,
        stochastic_depth_rate=config.stochastic_depth_rate,
        backbone=config.backbone,
        vit_size=config.vit_size,
        patch_size=config.patch_size,
        vit_pooling=config.vit_pooling,
        dtype=dtype,
    )
    model.build((None, config.image_size, config.image_size, 3))
    return model


@contextlib.contextmanager
def _shape_only_variables() -> Iterator[None]:
    """Variables created inside get a shape but no value: no memory, no initializer run.

    Keras defers initialising variables created in a `StatelessScope` and, unless told
    not to, initialises them all on exit; it also keeps them in a global pending list
    that the next StatelessScope exit (e.g. inside a symbolic call) would initialise.
    We restore that list, so the shape-only variables are never allocated.
    """
    # Private module, but the pending list has no public accessor.
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    pending = list(global_state.get_global_attribute(key, [], set_to_default=True))
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute(key, pending)


def _num_params(variables: list) -> int:
    total = 0
    for variable in variables:
        size = 1
        for dim in variable.shape:
            size *= int(dim)
        total += size
    return total


class _LayerList:
    """Several layers counted as one part."""

    def __init__(self, layers):
        self.weights = [w for layer in layers for w in layer.weights]
        self.trainable_weights = [w for layer in layers for w in layer.trainable_weights]


def count_parameters(image_size: int = 224, **model_kwargs: Any) -> dict[str, dict[str, int]]:
    """Parameters per part of `SimCLRModel(**model_kwargs)`, from one shape-only build.

    Returns {"all": counts, "trainable": counts}; "all" includes BN moving statistics
    (as the SimCLRv2 table counts). Parts: stem, block_group1..4 (a ViT: patch_embedding,
    encoder_blocks), backbone, projection_head, supervised_head, total. `num_classes` defaults to None and
    `cifar_stem` to `image_size <= 32`. Nothing is allocated.
    """
    model_kwargs.setdefault("num_classes", None)
    model_kwargs.setdefault("cifar_stem", image_size <= 32)
    with _shape_only_variables():
        model = SimCLRModel(**model_kwargs)
        model.build((None, image_size, image_size, 3))
        if isinstance(model.backbone, VisionTransformer):
            parts = {"patch_embedding": model.backbone.patch_embedding,
                     "encoder_blocks": _LayerList(model.backbone.blocks)}
        else:
            parts = {"stem": model.backbone.stem}
            parts.update((group.name, group) for group in model.backbone.block_groups)
        parts.update(
            backbone=model.backbone,
            projection_head=model.projection_head,
            supervised_head=model.supervised_head,
            total=model,
        )
        return {
            "all": {k: _num_params(v.weights if v else []) for k, v in parts.items()},
            "trainable": {
                k: _num_params(v.trainable_weights if v else []) for k, v in parts.items()
            },
        }


def parameter_counts(
    image_size: int = 224, *, trainable_only: bool = False, **model_kwargs: Any
) -> dict[str, int]:
    """Parameters per part (see `count_parameters`): all variables, or only trainable ones."""
    return count_parameters(image_size, **model_kwargs)["trainable" if trainable_only else "all"]


# SimCLRv2 (arXiv:2006.10029), Table 1: backbone parameters in millions, as
# (resnet_depth, width_multiplier, sk_ratio, millions); sk_ratio 0.0625 is the paper's SK.
PAPER_BACKBONE_PARAMS = (
    (50, 1, 0.0, 24),
    (50, 1, 0.0625, 35),
    (50, 2, 0.0, 94),
    (50, 2, 0.0625, 140),
    (101, 1, 0.0, 43),
    (101, 1, 0.0625, 65),
    (101, 2, 0.0, 170),
    (101, 2, 0.0625, 257),
    (152, 1, 0.0, 58),
    (152, 1, 0.0625, 89),
    (152, 2, 0.0, 233),
    (152, 2, 0.0625, 354),
    (152, 3, 0.0625, 795),
)


def backbone_param_count(
    resnet_depth: int,
    width_multiplier: float,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
    image_size: int = 224,
    *,
    trainable_only: bool = False,
) -> int:
    """Backbone parameters as the SimCLRv2 paper's table counts them.

    The table's 13 rows are reproduced by counting every backbone variable: conv
    kernels, BN gamma/beta AND BN moving mean/variance (trainable-only counts give
    232M / 353M instead of 233M / 354M for R152 2x / 2x SK). `trainable_only=True`
    counts only what the optimizer updates. Builds the real layers with shape-only
    variables, so even ResNet-152 3x SK (795M) takes about a second and no memory.
    """
    return parameter_counts(
        image_size,
        trainable_only=trainable_only,
        resnet_depth=resnet_depth,
        width_multiplier=width_multiplier,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
    )["backbone"]
