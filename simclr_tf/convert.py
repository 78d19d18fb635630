"""Checkpoints of the original google-research/simclr TF2 code -> `SimCLRModel` checkpoints.

Reads both formats of the original:
- a SavedModel directory, as released (`gs://simclr-checkpoints-tf2/simclrv2/.../saved_model/`):
  its `variables/variables` checkpoint, keyed by position (`model/resnet_model/variables/12/...`);
- a training checkpoint of the original `tf2/run.py` (`ckpt-N`), keyed by object path.

Both carry the original model's object graph, so every variable gets its object path
(`resnet_model/block_groups/0/layers/1/conv2d_bn_layers/2/conv2d/kernel`) whatever its key.
Variables are then placed by structure: grouped by the part of the model that owns them
(stem, block g/b, projection layer j, supervised head), ordered within the part by the
original's layer order — which is the order our layers create their weights in — and
checked by kind (`kernel`, `gamma`, ...) and shape against our part's weights. The
auto-numbered parts of the original names (`batch_norm_relu_72`) are never used.

    conversion = load_original("gs://.../r50_1x_sk1/saved_model/")  # model + Config
    convert_checkpoint(source, "runs/r50_1x_sk1")  # ckpt-N + config.json, for --checkpoint
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

from simclr_tf import export as export_lib
from simclr_tf.config import Config, ModelConfig
from simclr_tf.models import RESNET_SPECS, BottleneckBlock, build_model, num_projection_layers
from simclr_tf.train import checkpoints
from simclr_tf.train.experiment import read_saved_model_config, save_config, write_json

# The original checkpoints' root object holding the Keras model (`Checkpoint(model=...)`,
# and the SavedModel module's `self.model`).
ORIGINAL_ROOT = "model"

# Children that only alias a layer's variables or functions (SavedModel and Keras
# metadata); following them would give positional paths instead of structural ones.
_ALIASES = frozenset({
    "variables", "trainable_variables", "non_trainable_variables", "trainable_weights",
    "non_trainable_weights", "weights", "keras_api", "regularization_losses",
    "layer_regularization_losses", "metrics", "layer_metrics", "__call__",
    "call_and_return_all_conditional_losses", "call_and_return_conditional_losses",
    "signatures", "trainable_variables_list", "_self_saveable_object_factories",
})  # fmt: skip

# Order of the original's object-path tokens among their siblings, following the
# original's creation order; list items are ordered by their index.
_ORIGINAL_ORDER = {
    # residual / bottleneck blocks: shortcut first, then the main path, SE last
    "shortcut_layers": 0, "projection_layers": 0,
    "conv2d_bn_layers": 1, "conv_relu_dropblock_layers": 1, "se_layer": 2,
    # selective kernel conv
    "conv2d_fixed_padding": 0, "batch_norm_relu": 1, "conv2d_0": 2, "batch_norm_relu_1": 3, "conv2d_1": 4,
    # squeeze-excitation
    "se_reduce": 0, "se_expand": 1,
    # dense layers of the heads
    "dense": 0, "bn_relu": 1, "linear_layer": 0,
    # wrappers with a single child
    "conv2d": 0, "bn": 0,
    # variables
    "kernel": 0, "bias": 1, "gamma": 0, "beta": 1, "moving_mean": 2, "moving_variance": 3,
}  # fmt: skip

# Where each part of the original model lives, as (pattern, part key).
_PARTS = (
    (re.compile(r"resnet_model/initial_conv_relu_max_pool/(?P<rest>.+)"), lambda m: ("stem",)),
    (
        re.compile(r"resnet_model/block_groups/(?P<g>\d+)/layers/(?P<b>\d+)/(?P<rest>.+)"),
        lambda m: ("block", int(m["g"]), int(m["b"])),
    ),
    (
        re.compile(r"_projection_head/linear_layers/(?P<j>\d+)/(?P<rest>.+)"),
        lambda m: ("projection", int(m["j"])),
    ),
    (re.compile(r"supervised_head/(?P<rest>.+)"), lambda m: ("supervised_head",)),
)

SK_RATIO = 0.0625  # the SimCLRv2 paper's selective kernels (the released `*_sk1` models)


class ConversionError(ValueError):
    """An original checkpoint that this package's model cannot hold."""


@dataclasses.dataclass(frozen=True)
class OriginalVariable:
    """One variable of an original checkpoint."""

    path: str  # object path below the original model, e.g. "supervised_head/linear_layer/dense/bias"
    shape: tuple[int, ...]
    key: str = ""  # tensor key in the checkpoint
    name: str = ""  # the original variable name (for messages only)

    @property
    def kind(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.name or self.path} {list(self.shape)}"


def _part_of(path: str) -> tuple[tuple, tuple[int, ...]] | None:
    """(part key, order within the part) for an original object path; None if unknown."""
    for pattern, key in _PARTS:
        match = pattern.fullmatch(path)
        if match:
            tokens = match["rest"].split("/")
            if not all(t.isdigit() or t in _ORIGINAL_ORDER for t in tokens):
                return None
            return key(match), tuple(int(t) if t.isdigit() else _ORIGINAL_ORDER[t] for t in tokens)
    return None


def _describe_part(key: tuple) -> str:
    if key[0] == "block":
        return f"block {key[2] + 1} of block_group{key[1] + 1}"
    if key[0] == "projection":
        return f"projection layer {key[1]}"
    return {"stem": "the stem", "supervised_head": "the supervised head"}[key[0]]


def _kind(variable) -> str:
    return variable.path.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------
# Reading original checkpoints
# ---------------------------------------------------------------------------


def find_checkpoint(source: str) -> str:
    """The checkpoint prefix of `source`: a SavedModel directory (or its parent), a
    directory holding training checkpoints, or a checkpoint prefix."""
    source = source.rstrip("/")
    for prefix in (
        os.path.join(source, "variables", "variables"),
        os.path.join(source, "saved_model", "variables", "variables"),
    ):
        if tf.io.gfile.exists(prefix + ".index"):
            return prefix
    if tf.io.gfile.isdir(source):
        latest = tf.train.latest_checkpoint(source)
        # Copied checkpoints may come without their `checkpoint` state file.
        prefixes = [p[: -len(".index")] for p in tf.io.gfile.glob(os.path.join(source, "*.index"))]
        if latest or len(prefixes) == 1:
            return latest or prefixes[0]
        raise FileNotFoundError(
            f"{source} holds neither a SavedModel (variables/variables.index) nor one checkpoint "
            f"(found {len(prefixes)}: pass the prefix, e.g. {source}/ckpt-1000)"
        )
    if tf.io.gfile.exists(source + ".index"):
        return source
    raise FileNotFoundError(f"{source}: no such SavedModel directory or checkpoint ({source}.index)")


def read_original_variables(prefix: str) -> tuple[list[OriginalVariable], int]:
    """The original model's variables in checkpoint `prefix`, and its global step (0 if none).

    Every variable under the model must be reachable through the model's layers, else
    ConversionError names it.
    """
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    shapes = reader.get_variable_to_shape_map()
    roots = {child.local_name: child.node_id for child in graph.nodes[0].children}
    if ORIGINAL_ROOT not in roots:
        raise ConversionError(
            f"{prefix} has no `{ORIGINAL_ROOT}` object (it has {sorted(roots)}): not a checkpoint "
            "or SavedModel of the original SimCLR TF2 code"
        )

    def value_attribute(node_id):
        for attribute in graph.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                return attribute
        return None

    def breadth_first(follow_aliases: bool) -> dict[int, str]:
        # First path found = shortest, as TensorFlow names checkpoint keys.
        paths = {roots[ORIGINAL_ROOT]: ""}
        queue = collections.deque(paths)
        while queue:
            node_id = queue.popleft()
            for child in graph.nodes[node_id].children:
                if child.node_id in paths or (child.local_name in _ALIASES and not follow_aliases):
                    continue
                parent = paths[node_id]
                paths[child.node_id] = f"{parent}/{child.local_name}" if parent else child.local_name
                queue.append(child.node_id)
        return {n: p for n, p in paths.items() if value_attribute(n) is not None}

    structural = breadth_first(follow_aliases=False)
    variables = []
    for node_id, path in structural.items():
        attribute = value_attribute(node_id)
        key = attribute.checkpoint_key
        variables.append(OriginalVariable(path, tuple(shapes[key]), key, attribute.full_name))
    hidden = [
        f"{value_attribute(n).full_name} {list(shapes[value_attribute(n).checkpoint_key])}"
        for n in breadth_first(follow_aliases=True)
        if n not in structural
    ]
    if hidden:
        raise ConversionError(
            f"{prefix}: {len(hidden)} variable(s) belong to no layer of the model, cannot place: "
            + ", ".join(hidden[:10])
        )
    step = 0
    if "global_step" in roots and value_attribute(roots["global_step"]) is not None:
        step = int(reader.get_tensor(value_attribute(roots["global_step"]).checkpoint_key))
    return variables, step


# ---------------------------------------------------------------------------
# Which hidden the classifier reads, from a SavedModel's graph
# ---------------------------------------------------------------------------

# Scopes of the original's exported graph (auto-numbered when a name repeats: `_1`, ...).
_HEAD_SCOPE = re.compile(r"head_supervised(_\d+)?")
_PROJECTION_SCOPE = re.compile(r"projection_head(_\d+)?")
_PROJECTION_LAYER = re.compile(r"n?l_(?P<j>\d+)")  # `nl_<j>` (nonlinear) or `l_0` (linear)
_PROJECTION_INPUT = re.compile(r"proj_head_input(_\d+)?")
_BACKBONE_POOL = re.compile(r"final_avg_pool(_\d+)?")
# Ops between a hidden and the classifier's MatMul that leave the hidden as it is (the
# projection head's ReLU is part of hidden j+1; pretraining's linear eval adds a StopGradient).
_PASS_THROUGH = frozenset({"Identity", "IdentityN", "StopGradient", "Cast", "Relu", "Snapshot"})


def saved_model_graph_path(prefix: str) -> str | None:
    """The `saved_model.pb` of the SavedModel whose variables are at `prefix`, if there is one."""
    directory = os.path.dirname(prefix)
    if os.path.basename(prefix) != "variables" or os.path.basename(directory) != "variables":
        return None  # a training checkpoint
    path = os.path.join(os.path.dirname(directory), "saved_model.pb")
    return path if tf.io.gfile.exists(path) else None


def _hidden_read_by(nodes: dict, ref: str) -> int | None:
    """Which hidden the tensor `ref` of a graph is: 0 for the backbone's pooled features,
    j + 1 for projection layer j's output; None when the chain is not the original's."""
    for _ in range(100):  # chains are a few ops long; this only guards against cycles
        name, *rest = ref.lstrip("^").split(":")
        index = int(rest[-1]) if rest and rest[-1].isdigit() else 0
        node = nodes.get(name)
        if node is None:  # a function argument or an unknown name: the chain leaves this graph
            return None
        scopes = name.split("/")
        for i, scope in enumerate(scopes[:-1]):
            if _PROJECTION_SCOPE.fullmatch(scope):
                layer = _PROJECTION_LAYER.fullmatch(scopes[i + 1])
                if layer and len(scopes) > i + 2:
                    return int(layer["j"]) + 1
                if _PROJECTION_INPUT.fullmatch(scopes[i + 1]) and len(scopes) == i + 2:
                    return 0
        if scopes[0].startswith("resnet") and _BACKBONE_POOL.fullmatch(scopes[-1]):
            return 0
        inputs = [i for i in node.input if not i.startswith("^")]
        if node.op not in _PASS_THROUGH or not inputs:
            return None
        ref = inputs[index if node.op == "IdentityN" else 0]
    return None


def read_graph_ft_proj_selector(path: str) -> int | None:
    """The projection hidden the classifier of the original SavedModel `path`
    (`saved_model.pb`) reads, found by parsing its graph (which is never run).

    The original exports its model call as functions in which the classifier's dense layer
    is a MatMul under `head_supervised/`; its input, followed back through identities,
    comes from `projection_head/proj_head_input` or `resnet/final_avg_pool` (hidden 0) or
    from projection layer `projection_head/nl_<j>/...` (hidden j + 1). Returns None when no
    such chain is found or the functions disagree.
    """
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as f:
        saved_model.ParseFromString(f.read())
    graphs = []
    for meta_graph in saved_model.meta_graphs:
        graphs.append(meta_graph.graph_def.node)
        graphs.extend(function.node_def for function in meta_graph.graph_def.library.function)
    found = set()
    for graph_nodes in graphs:
        nodes = {node.name: node for node in graph_nodes}
        for node in graph_nodes:
            scopes = node.name.split("/")
            if node.op == "MatMul" and any(_HEAD_SCOPE.fullmatch(s) for s in scopes[:-1]) and node.input:
                selector = _hidden_read_by(nodes, node.input[0])
                if selector is not None:
                    found.add(selector)
    if len(found) == 1:
        return found.pop()
    if found:
        logging.warning("%s: the classifier reads different hiddens %s in different functions", path, sorted(found))
    else:
        logging.warning("%s: found no classifier reading the backbone or a projection layer", path)
    return None


# ---------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the variables of an original checkpoint say about its model."""

    resnet_depth: int
    width_multiplier: float
    sk_ratio: float
    se_ratio: float
    cifar_stem: bool
    proj_head_mode: str
    num_proj_layers: int
    proj_out_dim: int
    ft_proj_selector: int
    num_classes: int | None

    def model_config(self, image_size: int | None = None, **overrides) -> ModelConfig:
        """A ModelConfig for this architecture; `image_size` defaults to 32 / 224 by stem."""
        size = image_size or (32 if self.cifar_stem else 224)
        if (size <= 32) != self.cifar_stem:
            raise ValueError(
                f"--image_size: {size} does not fit the checkpoint's "
                f"{'CIFAR (3x3, stride 1)' if self.cifar_stem else 'ImageNet (strided, max-pool)'} stem; "
                f"use {'32 or less' if self.cifar_stem else 'more than 32'}."
            )
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        return ModelConfig(**{**values, "image_size": size, **overrides})


def _by_part(variables: Iterable[OriginalVariable]) -> dict[tuple, list[OriginalVariable]]:
    """Variables of each known part, in the original's order (unknown ones left out)."""
    parts: dict[tuple, list] = collections.defaultdict(list)
    for variable in variables:
        located = _part_of(variable.path)
        if located is not None:
            parts[located[0]].append((located[1], variable))
    return {key: [v for _, v in sorted(items)] for key, items in parts.items()}


def _kernels(variables: Sequence[OriginalVariable], token: str = "") -> list[tuple[int, ...]]:
    return [v.shape for v in variables if v.kind == "kernel" and (not token or token in v.path.split("/"))]


def _ratio(name: str, given: float | None, layers: list[tuple[int, int]], width, default=None) -> float:
    """A channel ratio r with width(filters, r) == units for all (filters, units) pairs."""
    candidates = [given] if given is not None else []
    if given is None:
        if default is not None:
            candidates.append(default)
        filters, units = max(layers)
        candidates.append(units / filters)
    for ratio in candidates:
        if all(width(f, ratio) == u for f, u in layers):
            return ratio
    raise ConversionError(
        f"--{name}: cannot find a ratio that gives the checkpoint's widths "
        f"(filters -> units: {sorted(set(layers))[:6]}); pass {name} explicitly"
    )


def infer_architecture(
    variables: Sequence[OriginalVariable],
    *,
    ft_proj_selector: int | None = None,
    graph_ft_proj_selector: int | None = None,
    sk_ratio: float | None = None,
    se_ratio: float | None = None,
) -> Architecture:
    """Depth, width, SK, SE, stem, heads and classes, from the variables' structure and shapes.

    Two things shapes cannot always tell. `sk_ratio` when every SK mixing layer has the
    minimum width 32: the paper's 0.0625 is then assumed (pass it to override).
    `ft_proj_selector` when several projection hiddens have the classifier's input width
    (for ResNet-50 1x the backbone and both middle layers are 2048 wide): it comes from
    `graph_ft_proj_selector` (read from a SavedModel's graph), else from
    `ft_proj_selector`, else ConversionError asks for it. Both given must agree.
    """
    parts = _by_part(variables)
    backbone = _backbone_architecture(parts, sk_ratio=sk_ratio, se_ratio=se_ratio)
    block_type = RESNET_SPECS[backbone["resnet_depth"]][0]
    features = (512 if block_type == "basic" else 2048) * backbone["width_multiplier"]
    head = _head_architecture(parts, features, ft_proj_selector, graph_ft_proj_selector)
    return Architecture(**backbone, **head)


def _backbone_architecture(parts: dict, *, sk_ratio: float | None, se_ratio: float | None) -> dict:
    blocks = sorted(key[1:] for key in parts if key[0] == "block")
    if {g for g, _ in blocks} != {0, 1, 2, 3}:
        raise ConversionError(f"expected ResNet blocks in 4 block groups, found {len(blocks)} block(s)")
    counts = tuple(sum(1 for g, _ in blocks if g == group) for group in range(4))
    block_vars = [v for key in parts if key[0] == "block" for v in parts[key]]
    bottleneck = any("conv_relu_dropblock_layers" in v.path.split("/") for v in block_vars)
    block_type = "bottleneck" if bottleneck else "basic"
    depths = [d for d, spec in RESNET_SPECS.items() if spec == (block_type, counts)]
    if not depths:
        raise ConversionError(f"{block_type} blocks per group {counts} match no ResNet depth {sorted(RESNET_SPECS)}")

    stem_convs = _kernels(parts.get(("stem",), []))
    if not stem_convs:
        raise ConversionError("no convolution in the stem (resnet_model/initial_conv_relu_max_pool)")
    width = stem_convs[-1][-1] / 64  # the stem ends with 64 * width filters
    # The CIFAR stem is one 3x3 conv; the ImageNet one a 7x7 conv or (with SK) three 3x3.
    cifar_stem = len(stem_convs) == 1 and stem_convs[0][0] == 3

    sk = 0.0
    sk_layers = [(s[2], s[3]) for s in _kernels(block_vars, "conv2d_0")]  # (filters, mixing width)
    if sk_layers:
        sk = _ratio("sk_ratio", sk_ratio, sk_layers, lambda f, r: max(int(f * r), 32), default=SK_RATIO)
    se = 0.0
    se_layers = []  # (base filters, reduced width); SE reads the block's output, 4x wider in bottlenecks
    for key in parts:
        reduce = _kernels(parts[key], "se_reduce") if key[0] == "block" else []
        if reduce:
            se_layers.append((reduce[0][2] // 4 if bottleneck else reduce[0][2], reduce[0][3]))
    if se_layers:
        se = _ratio("se_ratio", se_ratio, se_layers, lambda f, r: max(1, int(f * r)))
    return dict(
        resnet_depth=depths[0],
        width_multiplier=int(width) if float(width).is_integer() else width,
        sk_ratio=sk,
        se_ratio=se,
        cifar_stem=cifar_stem,
    )


def _head_architecture(parts: dict, features: float, given: int | None, read: int | None) -> dict:
    num_layers = sum(1 for key in parts if key[0] == "projection")
    if sorted(key[1] for key in parts if key[0] == "projection") != list(range(num_layers)):
        raise ConversionError("the projection head's layers are not numbered 0..n-1")
    dense = [_kernels(parts[("projection", j)], "dense")[0] for j in range(num_layers)]
    if num_layers == 0:
        mode, out_dim = "none", 128
    else:  # the original names its one linear-mode layer `l_0` (nonlinear: `nl_<j>`)
        linear = num_layers == 1 and any("/l_0/" in f"/{v.name}/" for v in parts[("projection", 0)])
        mode, out_dim = ("linear" if linear else "nonlinear"), dense[-1][1]

    widths = [features] + [shape[1] for shape in dense]  # of hiddens 0..num_layers
    if given is not None and not -len(widths) <= given < len(widths):
        raise ConversionError(f"--ft_proj_selector={given}: the checkpoint has hiddens 0..{num_layers} only")
    num_classes, selector = None, given or 0
    head = _kernels(parts.get(("supervised_head",), []))
    if head:
        num_classes = head[0][1]
        fits = [k for k, w in enumerate(widths) if w == head[0][0]]
        if read is not None and given is not None and given % len(widths) != read:
            hidden = "the backbone" if read == 0 else f"projection layer {read - 1}"
            raise ConversionError(
                f"--ft_proj_selector={given} disagrees with the SavedModel's graph (saved_model.pb), "
                f"whose classifier reads hidden {read} ({hidden}); drop --ft_proj_selector or pass {read}"
            )
        selector = read if read is not None else given
        if selector is not None and selector % len(widths) not in fits:
            what = f"the SavedModel graph's hidden {read}" if read is not None else f"--ft_proj_selector={given}"
            raise ConversionError(
                f"{what}: the supervised head reads {head[0][0]} features; "
                f"the hiddens 0..{num_layers} have widths {widths}"
            )
        if not fits:
            raise ConversionError(
                f"the supervised head reads {head[0][0]} features; no projection hidden has that width ({widths})"
            )
        if selector is None:
            if len(fits) > 1:
                raise ConversionError(
                    f"--ft_proj_selector is needed: the supervised head reads {head[0][0]} features and hiddens "
                    f"{fits} (0 = the backbone, k = projection layer k-1) all have that width, and no "
                    "SavedModel graph (saved_model.pb) tells which one it reads. Pass the value the model "
                    "was trained with (ft_proj_selector= in Python): 0 for pretrained models (the "
                    "original's default), 1 for models fine-tuned as the original README does; or "
                    "--drop_supervised_head to leave the classifier out."
                )
            selector = fits[0]
    return dict(
        proj_head_mode=mode,
        num_proj_layers=max(num_layers, 1) if mode == "nonlinear" else 3,
        proj_out_dim=out_dim,
        ft_proj_selector=selector,
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------
# Placing variables
# ---------------------------------------------------------------------------


def _require_resnet(model: keras.Model) -> None:
    if getattr(model, "backbone_name", "resnet") != "resnet":
        raise ValueError(
            f"the original SimCLR checkpoints hold ResNets; this model's backbone is "
            f"{model.backbone_name!r} (--backbone=resnet to convert or export in their format)."
        )


def model_parts(model: keras.Model) -> dict[tuple, keras.layers.Layer]:
    """Our model's layers keyed like the original's parts (see `_PARTS`)."""
    _require_resnet(model)
    parts = {("stem",): model.backbone.stem}
    for g, group in enumerate(model.backbone.block_groups):
        for b, block in enumerate(group.blocks):
            parts[("block", g, b)] = block
    for j, layer in enumerate(model.projection_head.linear_layers):
        parts[("projection", j)] = layer
    if model.supervised_head is not None:
        parts[("supervised_head",)] = model.supervised_head
    return parts


def place_variables(
    model: keras.Model, variables: Sequence[OriginalVariable], *, limit: int = 20
) -> list[tuple[OriginalVariable, keras.Variable]]:
    """Pairs every original variable with the weight of `model` it becomes.

    Raises ConversionError naming (name and shape) each original variable that has no
    place, and each weight of `model` left without a value.
    """
    problems = _outside_parts(variables)
    theirs = _by_part(variables)
    pairs = []
    for key, layer in model_parts(model).items():
        originals, ours = theirs.pop(key, []), layer.weights
        for i in range(max(len(originals), len(ours))):
            original = originals[i] if i < len(originals) else None
            weight = ours[i] if i < len(ours) else None
            if original is not None and weight is not None and original.kind == _kind(weight) and original.shape == tuple(weight.shape):
                pairs.append((original, weight))
                continue
            # Out of step from here on: report the rest of this part.
            where = _describe_part(key)
            for original in originals[i:]:
                problems.append(f"{original}: no weight of its kind and shape in {where} at this position")
            for weight in ours[i:]:
                problems.append(f"(ours) {weight.path} {list(weight.shape)}: no original variable in {where}")
            break
    for key, leftover in theirs.items():
        problems.extend(f"{v}: the model has no {_describe_part(key)}" for v in leftover)
    _raise_if_any(problems, limit)
    return pairs


def _outside_parts(variables: Iterable[OriginalVariable]) -> list[str]:
    return [
        f"{v}: not in the stem, a ResNet block, the projection head or the supervised head"
        for v in variables
        if _part_of(v.path) is None
    ]


def _raise_if_any(problems: list[str], limit: int = 20) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise ConversionError(
            f"Cannot place {len(problems)} variable(s):\n  " + "\n  ".join(problems[:limit]) + more
        )


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Conversion:
    """An original checkpoint loaded into our model."""

    model: keras.Model
    config: Config  # the model section describes the model; the rest are defaults
    architecture: Architecture
    step: int  # the original's global step (0 for SavedModels)
    source: str  # the checkpoint prefix read
    pairs: list[tuple[OriginalVariable, keras.Variable]]
    selector_from: str = ""  # where ft_proj_selector came from (a saved_model.pb, the flag, ...)


def load_original(
    source: str,
    *,
    image_size: int | None = None,
    ft_proj_selector: int | None = None,
    sk_ratio: float | None = None,
    se_ratio: float | None = None,
    supervised_head: bool = True,
) -> Conversion:
    """Builds our model for an original checkpoint and gives it the checkpoint's values.

    `supervised_head=False` leaves the original's classifier out (fine-tuning on other
    classes); the other arguments override what `infer_architecture` would infer. Which
    hidden the classifier reads is read from the SavedModel's graph when `source` has one.
    """
    if _our_config(source) is not None:
        raise ConversionError(f"{source} is already a checkpoint of this package (it has a config.json)")
    prefix = find_checkpoint(source)
    variables, step = read_original_variables(prefix)
    if not supervised_head:
        variables = [v for v in variables if not v.path.startswith("supervised_head/")]
    _raise_if_any(_outside_parts(variables))  # before inferring anything from the rest
    has_head = any(v.path.startswith("supervised_head/") for v in variables)
    graph = saved_model_graph_path(prefix) if has_head else None
    graph_selector = read_graph_ft_proj_selector(graph) if graph else None
    if graph_selector is not None:
        selector_from = graph
        logging.info("%s: the classifier reads hidden %d (ft_proj_selector)", graph, graph_selector)
    elif ft_proj_selector is not None:
        selector_from = "--ft_proj_selector"
    else:
        selector_from = "shapes" if has_head else "default (no supervised head)"
    architecture = infer_architecture(
        variables,
        ft_proj_selector=ft_proj_selector,
        graph_ft_proj_selector=graph_selector,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
    )
    model_config = architecture.model_config(image_size)
    model = build_model(model_config, num_classes=architecture.num_classes, global_bn=False)
    pairs = place_variables(model, variables)
    reader = tf.train.load_checkpoint(prefix)
    for original, weight in pairs:
        weight.assign(reader.get_tensor(original.key))
    logging.info("Loaded %d variables of %s into %s", len(pairs), prefix, architecture)
    return Conversion(model, Config(model=model_config), architecture, step, prefix, pairs, selector_from)


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    checkpoint: str  # our checkpoint prefix, <output_dir>/ckpt-<step>
    config: Config
    saved_model: str | None  # <output_dir>/saved_model/<step>, if exported
    selector_from: str = ""  # where ft_proj_selector came from (see Conversion)


def convert_checkpoint(
    source: str, output_dir: str, *, export_saved_model: bool = False, **kwargs
) -> ConvertedCheckpoint:
    """Writes `<output_dir>/ckpt-<step>` (a `tf.train.Checkpoint(model=...)` of our model, as
    `--checkpoint`/`--teacher_checkpoint` take), `config.json` (its architecture, read by
    distillation) and `conversion.json` (which original variable went where).

    `kwargs` go to `load_original`. `export_saved_model` also writes our SavedModel export.
    """
    if tf.io.gfile.isdir(output_dir) and tf.train.latest_checkpoint(output_dir):
        raise FileExistsError(f"{output_dir} already holds a checkpoint; pick a new output directory")
    conversion = load_original(source, **kwargs)
    model = conversion.model
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), output_dir, max_to_keep=1)
    path = manager.save(checkpoint_number=conversion.step)
    save_config(conversion.config, output_dir)
    our_paths = {id(v): p for p, v in checkpoints.model_variables_by_path(model).items()}
    write_json(
        os.path.join(output_dir, "conversion.json"),
        {
            "source": source,
            "checkpoint_read": conversion.source,
            "step": conversion.step,
            "architecture": dataclasses.asdict(conversion.architecture),
            "ft_proj_selector_from": conversion.selector_from,
            "variables": {
                our_paths[id(weight)]: {"original": o.name, "key": o.key, "shape": list(o.shape)}
                for o, weight in conversion.pairs
            },
        },
    )
    saved_model = None
    if export_saved_model:
        saved_model = export_lib.export_step(model, output_dir, conversion.step, keep_max=1)
    logging.info("Wrote %s (%d variables) and its config.json", path, len(conversion.pairs))
    return ConvertedCheckpoint(path, conversion.config, saved_model, conversion.selector_from)


# ---------------------------------------------------------------------------
# Loading either kind of checkpoint (notebooks)
# ---------------------------------------------------------------------------


def _our_config(source: str) -> Config | None:
    """The Config of a checkpoint of ours (from its config.json), None for other checkpoints."""
    saved = read_saved_model_config(source)
    if not saved:
        return None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return Config(model=ModelConfig(**{k: v for k, v in saved.items() if k in fields}))


def prepare_checkpoint(source: str, output_dir: str, **kwargs) -> tuple[str, Config]:
    """A checkpoint of ours for `source` and its Config: `source` itself if it is one of
    ours, else its conversion into `output_dir` (made once; `kwargs` go to `load_original`)."""
    config = _our_config(source)
    if config is not None:
        return source, config
    done = os.path.join(output_dir, "conversion.json")
    if tf.io.gfile.exists(done):
        with tf.io.gfile.GFile(done) as f:
            previous = json.load(f)["source"]
        if previous != source:
            raise FileExistsError(f"{output_dir} holds a conversion of {previous}, not of {source}")
        return output_dir, _our_config(output_dir)
    return output_dir, convert_checkpoint(source, output_dir, **kwargs).config


def load_pretrained(
    source: str,
    *,
    image_size: int | None = None,
    supervised_head: bool = True,
    ft_proj_selector: int | None = None,
) -> tuple[keras.Model, Config]:
    """Our model with the weights of `source`: an original SavedModel or checkpoint
    (converted in memory; `ft_proj_selector` as for `load_original`), or a checkpoint of
    ours next to its config.json."""
    config = _our_config(source)
    if config is None:
        conversion = load_original(
            source, image_size=image_size, supervised_head=supervised_head, ft_proj_selector=ft_proj_selector
        )
        return conversion.model, conversion.config
    if image_size:
        config = config.replace(model={"image_size": image_size})
    path = checkpoints.resolve_checkpoint_path(source)
    stored = checkpoints.checkpoint_variables_by_path(path)
    head = stored.get(f"{checkpoints.MODEL_ROOT}/supervised_head/linear_layer/dense/_kernel")
    m = config.model
    layers = f"{checkpoints.MODEL_ROOT}/projection_head/linear_layers/"
    kept = {p[len(layers):].split("/")[0] for p in stored if p.startswith(layers)}
    model = build_model(
        m,
        num_classes=head[1][1] if head and supervised_head else None,
        global_bn=False,
        # Fine-tuning runs keep only the projection layers below the classifier.
        drop_unused_projection_layers=len(kept) < num_projection_layers(m.proj_head_mode, m.num_proj_layers),
    )
    checkpoints.restore_model_weights(model, path, exact=False, required_prefixes=(f"{checkpoints.MODEL_ROOT}/",))
    return model, config


# ---------------------------------------------------------------------------
# The original's layout, for tests and offline examples: writes our model the way the
# original's training checkpoints hold it, so the converter can be run without a download.
# ---------------------------------------------------------------------------


def _leaf(prefix: str, layer: keras.layers.Layer) -> list[tuple[str, keras.Variable]]:
    return [(f"{prefix}/{_kind(v)}", v) for v in layer.weights]


def _conv(prefix, layer):  # Conv2dFixedPadding
    return _leaf(f"{prefix}/conv2d", layer)


def _bn(prefix, layer):  # BatchNormRelu
    return _leaf(f"{prefix}/bn", layer)


def _shortcut(prefix: str, block, container: str) -> list:
    if block.shortcut_conv is None:
        return []
    # With SK the original adds a FixedPadding (strided) and an AveragePooling2D first.
    first = (2 if block.strides > 1 else 1) if block.sk_ratio > 0 else 0
    return _conv(f"{prefix}/{container}/{first}", block.shortcut_conv) + _bn(
        f"{prefix}/{container}/{first + 1}", block.shortcut_batch_norm
    )


def _se(prefix: str, block) -> list:
    if block.se_layer is None:
        return []
    return _leaf(f"{prefix}/se_reduce", block.se_layer.se_reduce) + _leaf(
        f"{prefix}/se_expand", block.se_layer.se_expand
    )


def _block_layout(prefix: str, block) -> list:
    if not isinstance(block, BottleneckBlock):
        main = f"{prefix}/conv2d_bn_layers"
        return (
            _shortcut(prefix, block, "shortcut_layers")
            + _conv(f"{main}/0", block.conv1) + _bn(f"{main}/1", block.batch_norm1)
            + _conv(f"{main}/2", block.conv2) + _bn(f"{main}/3", block.batch_norm2)
            + _se(f"{prefix}/se_layer", block)
        )  # fmt: skip
    main = f"{prefix}/conv_relu_dropblock_layers"  # DropBlocks (no variables) take indices 2, 4/5, 7/8
    out = _shortcut(prefix, block, "projection_layers")
    out += _conv(f"{main}/0", block.conv1) + _bn(f"{main}/1", block.batch_norm1)
    if block.sk_conv is not None:
        sk = block.sk_conv
        out += (
            _conv(f"{main}/3/conv2d_fixed_padding", sk.conv) + _bn(f"{main}/3/batch_norm_relu", sk.batch_norm)
            + _leaf(f"{main}/3/conv2d_0", sk.mixing_conv0) + _bn(f"{main}/3/batch_norm_relu_1", sk.mixing_batch_norm)
            + _leaf(f"{main}/3/conv2d_1", sk.mixing_conv1)
        )  # fmt: skip
        last = 5
    else:
        out += _conv(f"{main}/3", block.conv2) + _bn(f"{main}/4", block.batch_norm2)
        last = 6
    out += _conv(f"{main}/{last}", block.conv3) + _bn(f"{main}/{last + 1}", block.batch_norm3)
    return out + _se(f"{main}/{last + 3}", block)


def original_layout(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """(original object path, our weight) for every weight of `model`, as the original
    TF2 code would hold the same model (the inverse of `place_variables`)."""
    _require_resnet(model)
    stem = model.backbone.stem
    if stem.cifar_stem or stem.sk_ratio == 0:  # [conv, identity, BN, (max-pool,) identity]
        indices = [0, 2]
    else:  # ResNet-D: [conv, BN, conv, BN, conv, identity, BN, max-pool, identity]
        indices = [0, 1, 2, 3, 4, 6]
    out = []
    for index, layer in zip(indices, stem.stem_layers):
        prefix = f"resnet_model/initial_conv_relu_max_pool/{index}"
        out += _bn(prefix, layer) if hasattr(layer, "bn") else _conv(prefix, layer)
    for key, layer in model_parts(model).items():
        if key[0] == "block":
            out += _block_layout(f"resnet_model/block_groups/{key[1]}/layers/{key[2]}", layer)
        elif key[0] == "projection":
            prefix = f"_projection_head/linear_layers/{key[1]}"
            out += _leaf(f"{prefix}/dense", layer.dense)
            if layer.batch_norm is not None:
                out += _bn(f"{prefix}/bn_relu", layer.batch_norm)
        elif key[0] == "supervised_head":
            out += _leaf("supervised_head/linear_layer/dense", layer.linear_layer.dense)
    return out


def write_original_checkpoint(
    values: dict[str, np.ndarray], prefix: str, *, names: dict[str, str] | None = None, global_step: int = 0
) -> str:
    """Writes a training checkpoint of the original's kind: each value at its object path
    below `model` (e.g. "supervised_head/linear_layer/dense/bias"), named `names[path]`."""
    node_type = tf.__internal__.tracking.AutoTrackable  # any attribute name, unlike tf.Module
    root = node_type()
    for path, value in values.items():
        *parents, leaf = path.split("/")
        node = root
        for token in parents:
            if not hasattr(node, token):
                setattr(node, token, node_type())
            node = getattr(node, token)
        setattr(node, leaf, tf.Variable(value, name=(names or {}).get(path, path)))
    step = tf.Variable(global_step, dtype=tf.int64, name="global_step")
    return tf.train.Checkpoint(**{ORIGINAL_ROOT: root, "global_step": step}).write(prefix)


def save_in_original_layout(model: keras.Model, prefix: str, *, global_step: int = 0) -> str:
    """Writes `model` as a training checkpoint of the original `tf2/run.py` would hold it."""
    values = {path: np.asarray(weight.numpy()) for path, weight in original_layout(model)}
    return write_original_checkpoint(values, prefix, global_step=global_step)


def write_original_graph(
    directory: str,
    *,
    features: int,
    num_proj_layers: int,
    proj_out_dim: int,
    num_classes: int,
    ft_proj_selector: int,
    linear_eval_while_pretraining: bool = False,
) -> str:
    """Writes `<directory>/saved_model.pb`: a SavedModel graph from the backbone's last
    feature map to the classifier, with the op names, scopes and op types the original's
    export has along that path (`resnet/final_avg_pool`, `projection_head/proj_head_input`,
    `projection_head/nl_<j>/...`, `projection_head/Relu_<n>`, `head_supervised/linear_layer/
    dense_<n>/MatMul`), for a nonlinear head whose classifier reads hidden
    `ft_proj_selector`. Weights are zeros: only the structure is meant to be read."""
    widths = [features] * num_proj_layers + [proj_out_dim]  # the inputs and last output of the layers

    class Exported(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, features], tf.float32)])
        def __call__(self, block_group4):
            with tf.name_scope("resnet"):
                pooled = tf.identity(tf.reduce_mean(block_group4, [1, 2], name="Mean"), name="final_avg_pool")
            with tf.name_scope("projection_head"):
                hiddens = [tf.identity(pooled, name="proj_head_input")]
                for j in range(num_proj_layers):
                    # Auto-numbered like the original's (its batch norms are numbered after the backbone's).
                    number = 21 + j
                    with tf.name_scope(f"nl_{j}"):
                        with tf.name_scope("dense" if j == 0 else f"dense_{j}"):
                            x = tf.matmul(hiddens[-1], tf.zeros([widths[j], widths[j + 1]]), name="MatMul")
                        with tf.name_scope(f"batch_norm_relu_{number}"):
                            with tf.name_scope(f"sync_batch_normalization_{number}"):
                                with tf.name_scope("batchnorm"):
                                    x = tf.add(tf.multiply(x, 1.0, name="mul_1"), 0.0, name="add_1")
                    if j != num_proj_layers - 1:
                        x = tf.nn.relu(x)
                    hiddens.append(x)
                output = tf.identity(hiddens[-1], name="proj_head_output")
            selected = hiddens[ft_proj_selector]
            if linear_eval_while_pretraining:
                selected = tf.stop_gradient(selected)
            with tf.name_scope("head_supervised"):
                with tf.name_scope("linear_layer"):
                    with tf.name_scope(f"dense_{num_proj_layers}"):
                        width = widths[ft_proj_selector % len(widths)]
                        logits = tf.matmul(selected, tf.zeros([width, num_classes]), name="MatMul")
                logits = tf.identity(logits, name="logits_sup")
            return {"final_avg_pool": pooled, "proj_head_output": output, "logits_sup": logits}

    with tempfile.TemporaryDirectory() as scratch:
        tf.saved_model.save(Exported(), scratch)
        tf.io.gfile.makedirs(directory)
        path = os.path.join(directory, "saved_model.pb")
        tf.io.gfile.copy(os.path.join(scratch, "saved_model.pb"), path, overwrite=True)
    return path


def save_as_original_saved_model(model: keras.Model, directory: str) -> str:
    """Writes `model` as a SavedModel directory of the original would hold it: its variables
    (`variables/variables`) and the graph of `write_original_graph` for its heads."""
    values = {path: np.asarray(weight.numpy()) for path, weight in original_layout(model)}
    write_original_checkpoint(values, os.path.join(directory, "variables", "variables"))
    head = model.projection_head
    if model.supervised_head is not None and head.mode == "nonlinear":
        write_original_graph(
            directory,
            features=head.linear_layers[0].dense.kernel.shape[0],
            num_proj_layers=head.num_layers,
            proj_out_dim=head.out_dim,
            num_classes=model.supervised_head.linear_layer.dense.kernel.shape[1],
            ft_proj_selector=head.ft_proj_selector,
        )
    return directory
