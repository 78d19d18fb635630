"""ResNet backbone: parameter counts, shapes, architecture details, serialization."""

import gc
import importlib.util
import pathlib
import resource

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import resnet as resnet_lib
from simclr_tf.models.resnet import (
    BatchNormRelu,
    BlockGroup,
    BottleneckBlock,
    Conv2dFixedPadding,
    ResidualBlock,
    ResNet,
    SelectiveKernelConv,
    SqueezeExcitation,
    Stem,
)
from simclr_tf.models.simclr_model import PAPER_BACKBONE_PARAMS, backbone_param_count, parameter_counts

SK = 0.0625



# ---------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth,width,sk_ratio,expected_millions", PAPER_BACKBONE_PARAMS)
def test_paper_table_parameter_counts(depth, width, sk_ratio, expected_millions):
    count = backbone_param_count(depth, width, sk_ratio)
    assert round(count / 1e6) == expected_millions, count


def test_trainable_only_count_is_not_what_the_table_counts():
    # Why backbone_param_count includes BN moving statistics: without them R152 2x is 232M.
    trainable = backbone_param_count(152, 2, 0.0, trainable_only=True)
    assert round(trainable / 1e6) == 232
    assert backbone_param_count(152, 2, 0.0) > trainable


class _Counter:
    """Hand count from layer shapes: trainable weights and BN channels (2 moving stats each)."""

    def __init__(self):
        self.trainable = 0
        self.bn_channels = 0

    def conv(self, k, cin, cout, bias=False):
        self.trainable += k * k * cin * cout + (cout if bias else 0)

    def bn(self, channels):
        self.trainable += 2 * channels  # gamma, beta
        self.bn_channels += channels

    @property
    def all(self):
        return self.trainable + 2 * self.bn_channels


def _hand_count(depth, width, sk_ratio=0.0, se_ratio=0.0, cifar_stem=False):
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth >= 50
    c = _Counter()
    stem = int(round(64 * width))
    if cifar_stem:
        c.conv(3, 3, stem)
        c.bn(stem)
    elif sk_ratio > 0:
        half = stem // 2
        c.conv(3, 3, half), c.bn(half), c.conv(3, half, half), c.bn(half)
        c.conv(3, half, stem), c.bn(stem)
    else:
        c.conv(7, 3, stem)
        c.bn(stem)
    cin = stem
    for group, num_blocks in enumerate(blocks):
        f = int(round(64 * 2**group * width))
        out = 4 * f if bottleneck else f
        for b in range(num_blocks):
            if b == 0:  # projection shortcut (a 1x1 conv, also with ResNet-D)
                c.conv(1, cin, out), c.bn(out)
            if bottleneck:
                c.conv(1, cin, f), c.bn(f)
                if sk_ratio > 0:
                    mid = max(int(f * sk_ratio), 32)
                    c.conv(3, f, 2 * f), c.bn(2 * f), c.conv(1, f, mid), c.bn(mid)
                    c.conv(1, mid, 2 * f)
                else:
                    c.conv(3, f, f), c.bn(f)
                c.conv(1, f, out), c.bn(out)
            else:
                c.conv(3, cin, f), c.bn(f), c.conv(3, f, f), c.bn(f)
            if se_ratio > 0:
                r = max(1, int(f * se_ratio))
                c.conv(1, out, r, bias=True), c.conv(1, r, out, bias=True)
            cin = out
    return c


@pytest.mark.parametrize(
    "depth,width,sk_ratio,se_ratio,image_size",
    [
        (18, 0.25, 0.0, 0.0, 32),  # cifar stem
        (18, 0.5, 0.0, 0.25, 64),  # 7x7 stem, SE in basic blocks
        (50, 0.25, SK, 0.0, 64),  # SK stem with 64*w//2 = 8 channels, SK mid_dim = 32
        (50, 0.25, 0.0, 0.25, 32),
        (50, 1, SK, 0.0, 224),
    ],
)
def test_hand_computed_counts(depth, width, sk_ratio, se_ratio, image_size):
    expected = _hand_count(depth, width, sk_ratio, se_ratio, cifar_stem=image_size <= 32)
    kwargs = dict(sk_ratio=sk_ratio, se_ratio=se_ratio, image_size=image_size)
    assert backbone_param_count(depth, width, trainable_only=True, **kwargs) == expected.trainable
    assert backbone_param_count(depth, width, **kwargs) == expected.all


def test_hand_count_of_tiny_resnet18_from_arithmetic():
    # ResNet-18 x0.25, cifar stem, written out: stem 3x3x3x16, then per group
    # (cin -> f): shortcut 1x1 + two 3x3 convs, one more block of two 3x3 convs;
    # each conv followed by a BN with 2 trainable params per channel.
    stem = 3 * 3 * 3 * 16 + 2 * 16
    groups = 0
    cin = 16
    for f in (16, 32, 64, 128):
        first = (cin * f + 2 * f) + (9 * cin * f + 2 * f) + (9 * f * f + 2 * f)
        second = 2 * (9 * f * f + 2 * f)
        groups += first + second
        cin = f
    assert stem + groups == 700_464  # worked out by hand as well
    assert backbone_param_count(18, 0.25, image_size=32, trainable_only=True) == 700_464
    # Depth 10 (ours, one block per group) is depth 18 without each group's second block.
    seconds = sum(2 * (9 * f * f + 2 * f) for f in (16, 32, 64, 128))
    assert backbone_param_count(10, 0.25, image_size=32, trainable_only=True) == 700_464 - seconds == 307_824


def test_parameter_counts_parts_add_up():
    counts = parameter_counts(32, num_classes=10, resnet_depth=18, width_multiplier=0.25)
    parts = ["stem", "block_group1", "block_group2", "block_group3", "block_group4"]
    assert sum(counts[p] for p in parts) == counts["backbone"]
    assert counts["backbone"] + counts["projection_head"] + counts["supervised_head"] == counts["total"]
    assert counts["supervised_head"] == 128 * 10 + 10


def test_param_count_allocates_no_variables():
    from keras.src.backend.common import global_state

    before = list(global_state.get_global_attribute("uninitialized_variables", []) or [])
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert round(backbone_param_count(152, 3, SK) / 1e6) == 795
    after = global_state.get_global_attribute("uninitialized_variables", []) or []
    # No variable is left pending for a later StatelessScope exit to initialise.
    assert [id(v) for v in after] == [id(v) for v in before]
    # 795M float32 parameters would be 3.2 GB.
    peak_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after_kb - peak_before_kb < 1_000_000


def _load_model_summary_tool():
    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "model_summary.py"
    spec = importlib.util.spec_from_file_location("model_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_summary_tool(capsys, monkeypatch):
    tool = _load_model_summary_tool()
    args = ["--resnet_depth=18", "--width_multiplier=0.25", "--image_size=32", "--num_classes=10"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "CIFAR stem" in out
    assert "700,464" in out  # trainable backbone, hand-computed above
    assert "supervised_head" in out and "1,290" in out  # 128 * 10 + 10
    assert gc.isenabled()
    # Exit status of --paper_table: one right row, one wrong row.
    monkeypatch.setattr(tool, "PAPER_BACKBONE_PARAMS", [(18, 0.25, 0.0, 1), (18, 0.25, 0.0, 2)])
    assert tool.main(["--paper_table"]) == 1
    assert "1/2 rows match" in capsys.readouterr().out
    monkeypatch.setattr(tool, "PAPER_BACKBONE_PARAMS", [(18, 0.25, 0.0, 1)])
    assert tool.main(["--paper_table"]) == 0


# ---------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------


def _images(n=2, size=32, seed=0):
    return np.random.RandomState(seed).uniform(size=(n, size, size, 3)).astype("float32")


@pytest.mark.parametrize(
    "depth,width,sk_ratio,se_ratio,cifar_stem,size",
    [
        (18, 0.25, 0.0, 0.0, True, 32),
        (18, 0.5, 0.0, 0.0, False, 64),
        (50, 0.25, 0.0, 0.0, True, 32),
        (50, 0.25, SK, 0.25, False, 64),
        (18, 0.25, SK, 0.25, True, 16),
        (18, 0.25, 0.0, 0.0, False, 33),  # odd size: every stride rounds up
    ],
)
def test_output_names_and_shapes(depth, width, sk_ratio, se_ratio, cifar_stem, size):
    model = ResNet(depth, width, sk_ratio=sk_ratio, se_ratio=se_ratio, cifar_stem=cifar_stem)
    outputs = model(_images(2, size), training=True)
    expansion = 4 if depth >= 50 else 1
    stem = int(round(64 * width))
    h = size if cifar_stem else -(-size // 2)
    expected = {"initial_conv": (2, h, h, stem)}
    h = h if cifar_stem else -(-h // 2)
    expected["initial_max_pool"] = (2, h, h, stem)
    for i in range(4):
        h = h if i == 0 else -(-h // 2)
        expected[f"block_group{i + 1}"] = (2, h, h, int(round(64 * 2**i * width)) * expansion)
    expected["final_avg_pool"] = (2, int(round(512 * width)) * expansion)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == expected
    assert model.compute_output_shape((2, size, size, 3)) == expected
    assert model.num_features == expected["final_avg_pool"][1]


def test_every_block_group_starts_with_a_projection_shortcut():
    for depth in (18, 50):
        model = ResNet(depth, 0.25, cifar_stem=True)
        for group in model.block_groups:
            assert group.blocks[0].shortcut_conv is not None
            assert all(block.shortcut_conv is None for block in group.blocks[1:])
        assert [len(g.blocks) for g in model.block_groups] == list(resnet_lib.RESNET_SPECS[depth][1])


def test_block_counts_per_depth():
    assert resnet_lib.RESNET_SPECS[101][1] == (3, 4, 23, 3)
    model = ResNet(152, 0.25)
    assert [len(g.blocks) for g in model.block_groups] == [3, 8, 36, 3]
    assert isinstance(model.block_groups[0].blocks[0], BottleneckBlock)
    assert isinstance(ResNet(34, 0.25).block_groups[0].blocks[0], ResidualBlock)
    with pytest.raises(ValueError, match="resnet_depth"):
        ResNet(19, 1)


def test_initialisation_and_batch_norm_settings():
    model = ResNet(50, 0.25, sk_ratio=SK, batch_norm_decay=0.95, cifar_stem=True)
    model.build((None, 32, 32, 3))
    block = model.block_groups[1].blocks[0]
    np.testing.assert_array_equal(block.batch_norm3.bn.gamma.numpy(), 0.0)  # last BN of the branch
    np.testing.assert_array_equal(block.batch_norm1.bn.gamma.numpy(), 1.0)
    np.testing.assert_array_equal(block.shortcut_batch_norm.bn.gamma.numpy(), 1.0)
    assert block.batch_norm1.bn.epsilon == 1e-5
    assert block.batch_norm1.bn.momentum == 0.95
    assert not block.shortcut_batch_norm.relu and not block.batch_norm3.relu
    conv = block.conv1.conv2d
    assert not conv.use_bias
    assert isinstance(conv.kernel_initializer, keras.initializers.VarianceScaling)
    # SK: two streams of `filters`, mixing width max(int(filters * sk_ratio), 32).
    assert block.sk_conv.conv.filters == 2 * 32
    assert block.sk_conv.mixing_conv0.filters == 32
    # ResNet-D shortcut: 1x1 stride-1 conv after average pooling.
    assert block.shortcut_conv.strides == 1 and block.strides == 2


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_branch_starts_at_zero(depth):
    # ResNet-18/34: the last BN of every basic block's branch starts with gamma = 0, so
    # each block starts as its shortcut (the bottleneck's case is checked above).
    model = ResNet(depth, 0.25, cifar_stem=True)
    model.build((None, 8, 8, 3))
    blocks = [block for group in model.block_groups for block in group.blocks]
    assert len(blocks) == {18: 8, 34: 16}[depth] and all(isinstance(b, ResidualBlock) for b in blocks)
    for block in blocks:
        np.testing.assert_array_equal(block.batch_norm2.bn.gamma.numpy(), 0.0)
        np.testing.assert_array_equal(block.batch_norm1.bn.gamma.numpy(), 1.0)
    # A block with an identity shortcut is then relu(x): the branch adds its beta, 0.
    identity_block = model.block_groups[0].blocks[1]
    x = tf.random.normal((2, 8, 8, identity_block.out_filters), seed=0)
    for training in (False, True):
        np.testing.assert_array_equal(identity_block(x, training=training).numpy(), tf.nn.relu(x).numpy())


def test_sk_stem_channels_for_fractional_width():
    stem = Stem(scaled := resnet_lib.scaled_filters(64, 0.25), sk_ratio=SK)
    assert scaled == 16
    convs = [layer for layer in stem.stem_layers if isinstance(layer, Conv2dFixedPadding)]
    assert [(c.filters, c.kernel_size, c.strides) for c in convs] == [(8, 3, 2), (8, 3, 1), (16, 3, 1)]
    assert resnet_lib.scaled_filters(64, 0.01) == 1  # never zero channels


def test_fixed_padding_conv_matches_explicit_pad_and_valid_conv():
    x = _images(1, 9)
    layer = Conv2dFixedPadding(4, 3, 2)
    y = layer(x)
    kernel = layer.conv2d.kernel.numpy()
    expected = tf.nn.conv2d(np.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), kernel, 2, "VALID")
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert y.shape == (1, 5, 5, 4)
    # 7x7/2 pads 3 on each side, unlike SAME (which pads 2 and 3 for even inputs).
    layer7 = Conv2dFixedPadding(2, 7, 2)
    x8 = _images(1, 8)
    y7 = layer7(x8)
    padded = np.pad(x8, [[0, 0], [3, 3], [3, 3], [0, 0]])
    expected7 = tf.nn.conv2d(padded, layer7.conv2d.kernel.numpy(), 2, "VALID")
    np.testing.assert_allclose(y7, expected7, rtol=1e-5, atol=1e-6)


def test_selective_kernel_conv_mixes_two_streams_with_softmax():
    layer = SelectiveKernelConv(4, 1, SK)
    x = _images(2, 6)
    y = layer(x, training=False).numpy()
    streams = layer.batch_norm(layer.conv(x), training=False).numpy()
    a, b = streams[..., :4], streams[..., 4:]
    # Output is a convex combination per (example, channel) of the two streams.
    lo, hi = np.minimum(a, b) - 1e-5, np.maximum(a, b) + 1e-5
    assert np.all((y >= lo) & (y <= hi))
    pooled = (a + b).mean(axis=(1, 2), keepdims=True)
    logits = layer.mixing_conv1(layer.mixing_batch_norm(layer.mixing_conv0(pooled))).numpy()
    w = np.exp(logits[..., :4]) / (np.exp(logits[..., :4]) + np.exp(logits[..., 4:]))
    np.testing.assert_allclose(y, w * a + (1 - w) * b, rtol=1e-4, atol=1e-5)


def test_squeeze_excitation_reduce_width_and_gating():
    layer = SqueezeExcitation(filters=16, se_ratio=0.25)
    x = np.random.RandomState(0).normal(size=(2, 4, 4, 64)).astype("float32")
    y = layer(x).numpy()
    assert layer.se_reduce.filters == 4 and layer.se_expand.filters == 64
    assert np.all(np.abs(y) <= np.abs(x) + 1e-6)  # sigmoid gate in (0, 1)


# ---------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------

LAYER_CASES = [
    (BatchNormRelu(relu=False, init_zero=True, center=False, batch_norm_decay=0.8, global_bn=True), (2, 4, 4, 3)),
    (Conv2dFixedPadding(5, 3, 2), (2, 7, 7, 3)),
    (SelectiveKernelConv(4, 2, SK, batch_norm_decay=0.7), (2, 8, 8, 3)),
    (SqueezeExcitation(4, 0.5), (2, 4, 4, 3)),
    (ResidualBlock(4, 2, use_projection=True, sk_ratio=SK, se_ratio=0.25), (2, 8, 8, 3)),
    (BottleneckBlock(2, 1, use_projection=True), (2, 8, 8, 3)),
    (BlockGroup(2, "bottleneck", 2, 2, sk_ratio=SK), (2, 8, 8, 3)),
    (Stem(8, cifar_stem=False, sk_ratio=SK), (2, 16, 16, 3)),
    (ResNet(18, 0.25, cifar_stem=True, fine_tune_after_block=1), (2, 16, 16, 3)),
]


@pytest.mark.parametrize("layer,shape", LAYER_CASES, ids=lambda c: type(c).__name__)
def test_layer_config_round_trip(layer, shape):
    config = layer.get_config()
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"simclr_tf>{type(layer).__name__}"
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    assert clone.get_config() == config
    layer.build(shape)
    clone.build(shape)
    assert [tuple(v.shape) for v in clone.weights] == [tuple(v.shape) for v in layer.weights]
    rng = np.random.RandomState(1)
    for v in layer.weights:  # non-trivial BN statistics too
        v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32"))
    clone.set_weights(layer.get_weights())
    x = rng.uniform(size=shape).astype("float32")
    kwargs = {} if isinstance(layer, (Conv2dFixedPadding, SqueezeExcitation)) else {"training": False}
    y, y_clone = layer(x, **kwargs), clone(x, **kwargs)
    for a, b in zip(keras.tree.flatten(y), keras.tree.flatten(y_clone)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert keras.tree.map_structure(lambda t: tuple(t.shape), y) == layer.compute_output_shape(shape)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda **kw: BatchNormRelu(**kw), (2, 4, 4, 3)),
        (lambda **kw: BottleneckBlock(2, 1, use_projection=True, sk_ratio=SK, se_ratio=0.5, **kw), (2, 8, 8, 3)),
        (lambda **kw: Stem(4, sk_ratio=SK, **kw), (2, 8, 8, 3)),
        (lambda **kw: ResNet(18, 0.25, cifar_stem=True, se_ratio=0.25, **kw), (2, 8, 8, 3)),
    ],
    ids=["bn", "block", "stem", "resnet"],
)
def test_constructor_trainable_false_reaches_every_sub_layer(make, shape):
    # Keras applies `trainable=False` in Layer.__init__, before our sub-layers exist;
    # a frozen layer restored from its config must still be frozen throughout.
    frozen = make(trainable=False)
    clone = type(frozen).from_config(frozen.get_config())
    for layer in (frozen, clone):
        layer.build(shape)
        assert not layer.trainable_weights
        assert not any(v.trainable for v in layer.weights)
        assert not any(sub.trainable for sub in layer._flatten_layers())
    x = np.random.RandomState(0).uniform(size=shape).astype("float32")
    bn = [v for v in frozen.weights if "moving_mean" in v.path]
    frozen(x, training=True)
    assert all(np.all(v.numpy() == 0) for v in bn)  # BN ran in inference mode
