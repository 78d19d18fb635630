"""Checkpoints: save, and restore in a written priority order with an exact report.

Restore priority for a training run:
1. the latest checkpoint in `model_dir` (resume: model, optimizer and step), which must
   match the model exactly;
2. else `--checkpoint` (initialise the model's weights only, e.g. pretrain -> finetune):
   every variable found with the same shape is restored, the rest is listed as freshly
   initialised, and the backbone must be restored in full;
3. else train from scratch.

Matching is by object path (`model/backbone/block_groups/0/...`) read from the
checkpoint's own object graph, so it does not depend on which of several paths TF
used to name a value, and nothing is ever restored silently in part.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from absl import logging
import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

MODEL_ROOT = "model"
BACKBONE_PREFIX = "model/backbone/"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is restored into."""


@dataclasses.dataclass(frozen=True)
class VariableMatch:
    """How a model's variables line up with a checkpoint's, by object path."""

    restored: list[str]
    missing: list[str]  # in the model, not in the checkpoint
    mismatched: list[str]  # same path, different shape: "path: model [..] vs checkpoint [..]"
    unused: list[str]  # in the checkpoint's model, not in ours
    # Shape of every path above: the model's, or the checkpoint's for `unused`.
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.mismatched or self.unused)

    def describe(self, limit: int | None = 20, *, restored: bool = False) -> str:
        """The differences, one `path [shape]` per line (and the restored paths if asked)."""
        lines = []
        for title, items in (
            ("different shape", self.mismatched),
            ("missing from the checkpoint", self.missing),
            ("in the checkpoint but not in the model", self.unused),
            ("restored", self.restored if restored else []),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}{_shape_suffix(self.shapes.get(item))}" for item in items[:limit])
                if limit is not None and len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def _shape_suffix(shape: list[int] | None) -> str:
    return "" if shape is None else f" {shape}"


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    source: str  # "model_dir", "checkpoint" or "scratch"
    path: str | None
    step: int
    match: VariableMatch | None = None


def model_variables_by_path(model: keras.Model) -> dict[str, tf.Variable]:
    """Our model's variables keyed by their checkpoint object path (`model/...`)."""
    view = tf.train.TrackableView(tf.train.Checkpoint(model=model))
    found: dict[str, tf.Variable] = {}
    seen: set[int] = set()

    def walk(obj, prefix: str) -> None:
        for name, child in view.children(obj).items():
            path = f"{prefix}/{name}"
            if isinstance(child, (tf.Variable, keras.Variable)):
                if id(child) not in seen:
                    seen.add(id(child))
                    found[path] = child
            elif id(child) not in seen:
                seen.add(id(child))
                walk(child, path)

    walk(model, MODEL_ROOT)
    return found


def checkpoint_variables_by_path(path: str, root: str = MODEL_ROOT) -> dict[str, tuple[str, list[int]]]:
    """Object path -> (tensor key, shape) for the variables under `root` in a checkpoint."""
    reader = tf.train.load_checkpoint(path)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    shapes = reader.get_variable_to_shape_map()
    found: dict[str, tuple[str, list[int]]] = {}

    def walk(node_id: int, prefix: str, on_path: frozenset) -> None:
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                found[prefix] = (attribute.checkpoint_key, list(shapes[attribute.checkpoint_key]))
        for child in node.children:
            if child.node_id not in on_path:
                walk(child.node_id, f"{prefix}/{child.local_name}", on_path | {child.node_id})

    for child in graph.nodes[0].children:
        if child.local_name == root:
            walk(child.node_id, root, frozenset({0, child.node_id}))
    return found


def match_variables(model: keras.Model, path: str) -> VariableMatch:
    ours = model_variables_by_path(model)
    theirs = checkpoint_variables_by_path(path)
    restored, missing, mismatched = [], [], []
    shapes = {name: theirs[name][1] for name in theirs}
    shapes.update({name: list(variable.shape) for name, variable in ours.items()})
    for name, variable in ours.items():
        if name not in theirs:
            missing.append(name)
        elif list(variable.shape) != theirs[name][1]:
            mismatched.append(f"{name}: model {list(variable.shape)} vs checkpoint {theirs[name][1]}")
        else:
            restored.append(name)
    unused = [name for name in theirs if name not in ours]
    return VariableMatch(restored, missing, mismatched, unused, shapes)


def restore_model_weights(
    model: keras.Model,
    path: str,
    *,
    exact: bool,
    required_prefixes: Iterable[str] = (BACKBONE_PREFIX,),
) -> VariableMatch:
    """Assigns every variable the checkpoint holds with the same shape.

    Raises CheckpointMismatchError, before assigning anything, if `exact` and the two
    differ at all, or if a shape differs, or if a variable under `required_prefixes`
    is missing.
    """
    match = match_variables(model, path)
    prefixes = tuple(required_prefixes)
    required_missing = [m for m in match.missing if m.startswith(prefixes)]
    if match.mismatched or required_missing or (exact and not match.exact):
        required = (
            f" {len(required_missing)} variable(s) under {', '.join(prefixes)} would not be "
            "restored, and those must all come from the checkpoint."
            if required_missing else ""
        )
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not fit this model (check the architecture flags: "
            f"--resnet_depth, --width_multiplier, --sk_ratio, --se_ratio, the projection head "
            f"and the number of classes).{required}\n{match.describe()}"
        )
    reader = tf.train.load_checkpoint(path)
    keys = checkpoint_variables_by_path(path)
    variables = model_variables_by_path(model)
    for name in match.restored:
        variables[name].assign(reader.get_tensor(keys[name][0]))
    return match


def make_manager(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, model_dir: str, max_to_keep: int
) -> tf.train.CheckpointManager:
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return tf.train.CheckpointManager(checkpoint, directory=model_dir, max_to_keep=max_to_keep)


def restore(
    manager: tf.train.CheckpointManager,
    *,
    init_checkpoint: str | None,
    zero_init_logits_layer: bool = False,
) -> RestoreReport:
    """Restores following the priority order above; returns what was done."""
    checkpoint = manager.checkpoint
    model = checkpoint.model
    latest = manager.latest_checkpoint
    if latest:
        match = match_variables(model, latest)
        if not match.exact:
            raise CheckpointMismatchError(
                f"{manager.directory} holds a checkpoint of a different model ({latest}); "
                "use another --model_dir, or the flags of the run that wrote it:\n"
                + match.describe()
            )
        logging.info("Resuming from %s", latest)
        checkpoint.restore(latest).assert_existing_objects_matched()
        return RestoreReport("model_dir", latest, int(checkpoint.optimizer.iterations.numpy()), match)
    if init_checkpoint:
        path = resolve_checkpoint_path(init_checkpoint)
        match = restore_model_weights(model, path, exact=False)
        # Every path, so a run's log shows exactly what came from where.
        logging.info(
            "Initialised from %s: %s\n%s", path, summarize(match), match.describe(limit=None, restored=True)
        )
        if zero_init_logits_layer and getattr(model, "supervised_head", None) is not None:
            for variable in model.supervised_head.trainable_weights:
                variable.assign(tf.zeros_like(variable))
            logging.info("Zero-initialised the supervised head (--zero_init_logits_layer)")
        return RestoreReport("checkpoint", path, 0, match)
    logging.info("No checkpoint in %s and no --checkpoint: training from scratch", manager.directory)
    return RestoreReport("scratch", None, 0)


def summarize(match: VariableMatch) -> str:
    """One line per outcome, grouping paths by model part, e.g. 'restored: backbone (62)'."""
    def groups(paths: list[str]) -> str:
        counts: dict[str, int] = {}
        for path in paths:
            parts = path.split("/")[1:]
            # Projection layers are kept or dropped one by one (--ft_proj_selector).
            part = "/".join(parts[:3]) if parts[0] == "projection_head" else parts[0]
            counts[part] = counts.get(part, 0) + 1
        return ", ".join(f"{part} ({n})" for part, n in counts.items()) or "none"

    return (
        f"restored {len(match.restored)} variables: {groups(match.restored)}; "
        f"freshly initialised {len(match.missing)}: {groups(match.missing)}; "
        f"not used from the checkpoint {len(match.unused)}: {groups(match.unused)}"
    )


def resolve_checkpoint_path(path: str, flag: str = "checkpoint") -> str:
    """Accepts a checkpoint prefix or a directory holding checkpoints; errors name `--flag`."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(
                f"--{flag}={path} is a directory without a checkpoint; pass a checkpoint "
                "prefix such as <model_dir>/ckpt-1000 or a model_dir that holds one."
            )
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"--{flag}={path}: no such checkpoint ({path}.index is missing). Pass a "
            "checkpoint prefix such as <model_dir>/ckpt-1000 or a model_dir."
        )
    return path
