"""Model code: ResNet backbone, heads and the SimCLR model."""

from simclr_tf.models.heads import (
    PROJ_HEAD_MODES,
    LinearLayer,
    ProjectionHead,
    SupervisedHead,
    num_projection_layers,
)
from simclr_tf.models.resnet import (
    BLOCK_GROUP_NAMES,
    RESNET_SPECS,
    BatchNormRelu,
    BlockGroup,
    BottleneckBlock,
    Conv2dFixedPadding,
    ResidualBlock,
    ResNet,
    SelectiveKernelConv,
    SqueezeExcitation,
    Stem,
    scaled_filters,
)
from simclr_tf.models.simclr_model import (
    OUTPUT_KEYS,
    SimCLRModel,
    backbone_param_count,
    build_model,
    count_parameters,
    parameter_counts,
)

__all__ = [
    "BLOCK_GROUP_NAMES",
    "OUTPUT_KEYS",
    "PROJ_HEAD_MODES",
    "RESNET_SPECS",
    "BatchNormRelu",
    "BlockGroup",
    "BottleneckBlock",
    "Conv2dFixedPadding",
    "LinearLayer",
    "ProjectionHead",
    "ResNet",
    "ResidualBlock",
    "SelectiveKernelConv",
    "SimCLRModel",
    "SqueezeExcitation",
    "Stem",
    "SupervisedHead",
    "backbone_param_count",
    "build_model",
    "count_parameters",
    "num_projection_layers",
    "parameter_counts",
    "scaled_filters",
]
