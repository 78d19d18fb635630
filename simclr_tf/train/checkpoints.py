"""Checkpoints: save, and restore in a written priority order with an exact report.

Restore priority for a training run:
1. the newest readable checkpoint in `model_dir` (resume: model, optimizer and step),
   which must match the model exactly;
2. else `--checkpoint` (initialise the model's weights only, e.g. pretrain -> finetune):
   every variable found with the same shape is restored, the rest is listed as freshly
   initialised, and the backbone must be restored in full;
3. else train from scratch.

Matching is by object path (`model/backbone/block_groups/0/...`) read from the
checkpoint's own object graph, so it does not depend on which of several paths TF
used to name a value, and nothing is ever restored silently in part.

"Readable" is checked for real: every tensor of a checkpoint is read once before it is
used (TF checks each tensor's CRC32C and the index's block checksums). A damaged newest
checkpoint (a full disk, a half-finished copy) is skipped with a warning for the newest
one that reads; in the model_dir a run trains in, its files are moved to
`<model_dir>/damaged/<UTC time>/`, never deleted, and a save of the same step cannot
overwrite them. Checkpoints in other directories (`--checkpoint`, `--teacher_checkpoint`,
and model_dir while only evaluating) are never moved.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Iterable, Sequence

from absl import logging
import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

MODEL_ROOT = "model"
BACKBONE_PREFIX = "model/backbone/"
# Where a training run moves the files of checkpoints that cannot be read, inside model_dir.
DAMAGED_DIR = "damaged"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is restored into."""


class UnreadableCheckpointError(ValueError):
    """The checkpoint named, or every checkpoint of a directory, cannot be read back intact."""


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


def model_variables_by_path(model: keras.Model, root: str = MODEL_ROOT) -> dict[str, tf.Variable]:
    """Our model's (or any trackable's) variables keyed by their checkpoint object path (`<root>/...`)."""
    view = tf.train.TrackableView(tf.train.Checkpoint(**{root: model}))
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

    walk(model, root)
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


def match_variables(
    model: keras.Model, path: str, *, root: str = MODEL_ROOT, checkpoint_root: str | None = None
) -> VariableMatch:
    """Our `model`'s variables (paths under `root`) against the checkpoint's under
    `checkpoint_root` (default: the same root), e.g. a weight average read into a model."""
    ours = model_variables_by_path(model, root)
    theirs = checkpoint_variables_by_path(path, checkpoint_root or root)
    if checkpoint_root and checkpoint_root != root:
        theirs = {root + name[len(checkpoint_root):]: value for name, value in theirs.items()}
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
    checkpoint_root: str = MODEL_ROOT,
) -> VariableMatch:
    """Assigns every variable the checkpoint holds with the same shape.

    `checkpoint_root`: the checkpoint's object whose weights are read (another model
    saved beside the trained one, e.g. its weight average). Raises
    CheckpointMismatchError, before assigning anything, if `exact` and the two differ
    at all, or if a shape differs, or if a variable under `required_prefixes` is missing.
    """
    match = match_variables(model, path, checkpoint_root=checkpoint_root)
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
    keys = checkpoint_variables_by_path(path, checkpoint_root)
    variables = model_variables_by_path(model)
    for name in match.restored:
        variables[name].assign(reader.get_tensor(keys[checkpoint_root + name[len(MODEL_ROOT):]][0]))
    return match


def make_manager(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    model_dir: str,
    max_to_keep: int,
    extra: dict | None = None,
) -> tf.train.CheckpointManager:
    """Checkpoints of `model`, `optimizer` and a method's `extra` state (by key)."""
    extra = dict(extra or {})
    if {MODEL_ROOT, "optimizer"} & set(extra):
        raise ValueError(f"Extra checkpoint items cannot be named {MODEL_ROOT!r} or 'optimizer': {sorted(extra)}")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, **extra)
    manager = tf.train.CheckpointManager(checkpoint, directory=model_dir, max_to_keep=max_to_keep)
    manager.extra_items = extra  # checked exactly on resume, like the model
    return manager


def restore(
    manager: tf.train.CheckpointManager,
    *,
    init_checkpoint: str | None,
    zero_init_logits_layer: bool = False,
    set_aside: bool = True,
) -> RestoreReport:
    """Restores following the priority order above; returns what was done.

    With `set_aside` (the process that writes model_dir's checkpoints), unreadable
    checkpoints newer than the one resumed from are moved to model_dir/damaged/ and
    dropped from the manager's list.
    """
    checkpoint = manager.checkpoint
    model = checkpoint.model
    latest = _resume_path(manager, set_aside) if manager.latest_checkpoint else None
    if latest:
        match = match_variables(model, latest)
        extra = getattr(manager, "extra_items", {})
        differences = [match] + [match_variables(item, latest, root=key) for key, item in extra.items()]
        if not all(m.exact for m in differences):
            raise CheckpointMismatchError(
                f"{manager.directory} holds a checkpoint of a different model ({latest}); "
                "use another --model_dir, or the flags of the run that wrote it:\n"
                + "\n".join(m.describe() for m in differences if not m.exact)
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


def _resume_path(manager: tf.train.CheckpointManager, set_aside: bool) -> str:
    """The newest readable checkpoint the manager lists; newer unreadable ones are set aside."""
    listed = _dedupe([manager.latest_checkpoint, *reversed(manager.checkpoints)])
    path, skipped = newest_readable(listed)
    if path is None:
        raise UnreadableCheckpointError(
            f"--model_dir={manager.directory}: none of its {len(skipped)} checkpoint(s) can be "
            f"read back intact:\n{_problem_lines(skipped)}\nNothing was moved or deleted. Copy "
            "intact checkpoints back from a backup, or move these away (or use a new --model_dir) "
            "to start the run again."
        )
    if skipped:
        damaged = [bad for bad, _ in skipped]
        where = _move_aside(damaged, manager.directory) if set_aside else None
        for bad, problem in skipped:
            logging.warning(
                "Checkpoint %s cannot be read (%s); %s. Resuming from the newest readable one, %s: "
                "the steps after it are trained again.",
                bad, problem,
                f"moved its files to {where}" if where else "left in place (another process writes this directory)",
                path,
            )
        if where:
            _forget(manager, damaged, path)
    return path


def _forget(manager: tf.train.CheckpointManager, paths: Sequence[str], latest: str) -> None:
    """Drops moved-away checkpoints from the manager's list and its `checkpoint` state file."""
    # CheckpointManager has no public call for this. Its list decides what the next save
    # records and which checkpoints --keep_checkpoint_max deletes, so it must not keep
    # naming files that are gone; this sets what its constructor would read from the file.
    for path in paths:
        manager._maybe_delete.pop(path, None)
    manager._latest_checkpoint = latest
    manager._record_state()


def _move_aside(paths: Sequence[str], directory: str) -> str:
    """Moves each checkpoint's files to a new `<directory>/damaged/<UTC time>/`; returns it."""
    base = os.path.join(directory, DAMAGED_DIR, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    destination, n = base, 1
    while tf.io.gfile.exists(destination):  # a second damage within the same second
        destination, n = f"{base}-{n}", n + 1
    tf.io.gfile.makedirs(destination)
    for path in paths:
        # `ckpt-5.*` is ckpt-5.index and its data shards, never ckpt-50's files.
        for name in tf.io.gfile.glob(path + ".*"):
            tf.io.gfile.rename(name, os.path.join(destination, os.path.basename(name)))
    return destination


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
    """Accepts a checkpoint prefix or a directory holding checkpoints; errors name `--flag`.

    In a directory, the newest checkpoint that reads back intact is used; newer unreadable
    ones are skipped with a warning and left where they are: the directory belongs to
    another run (or to the trainer, while only evaluating), which may be writing it.
    """
    if tf.io.gfile.isdir(path):
        listed = listed_checkpoints(path)
        if not listed:
            raise FileNotFoundError(
                f"--{flag}={path} is a directory without a checkpoint; pass a checkpoint "
                "prefix such as <model_dir>/ckpt-1000 or a model_dir that holds one."
            )
        return _newest_readable_or_raise(listed, f"--{flag}={path}")
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"--{flag}={path}: no such checkpoint ({path}.index is missing). Pass a "
            "checkpoint prefix such as <model_dir>/ckpt-1000 or a model_dir."
        )
    problem = checkpoint_problem(path)
    if problem:
        raise UnreadableCheckpointError(
            f"--{flag}={path} cannot be read back intact: {problem}. Pass an intact checkpoint, "
            "or its directory to use the newest one there that reads."
        )
    return path


def readable_checkpoint_at_or_before(directory: str, latest: str) -> str:
    """`latest` if it reads back intact, else the newest older checkpoint listed that does.

    For evaluating a model_dir: skipped checkpoints are named in a warning and left in place.
    """
    listed = listed_checkpoints(directory)
    older = listed[listed.index(latest) + 1:] if latest in listed else listed
    return _newest_readable_or_raise([latest, *older], f"--model_dir={directory}")


def listed_checkpoints(directory: str) -> list[str]:
    """The checkpoints a directory's `checkpoint` state file lists, newest first."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    return _dedupe([state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)])


def newest_readable(paths: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The first of `paths` (newest first) that reads intact, and (path, problem) of those before it."""
    skipped = []
    for path in paths:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _newest_readable_or_raise(paths: Sequence[str], what: str) -> str:
    path, skipped = newest_readable(paths)
    if path is None:
        raise UnreadableCheckpointError(
            f"{what}: none of its {len(skipped)} checkpoint(s) can be read back intact:\n"
            f"{_problem_lines(skipped)}"
        )
    for bad, problem in skipped:
        _warn_once(f"{what}: skipping checkpoint {bad}, which cannot be read ({problem}); using {path}")
    return path


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # A checkpoint path is resolved twice in a run (flag checks, then the restore).
    if message not in _warned:
        _warned.add(message)
        logging.warning("%s", message)


def _problem_lines(skipped: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"  {path}: {problem}" for path, problem in skipped)


def _dedupe(paths: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(p for p in paths if p))


# Checkpoints found intact so far, by path and the identity of their files: a checkpoint
# checked while validating flags is not read a second time before its restore. Only intact
# ones are remembered: a damaged one is moved aside and the same step may be saved again
# within the file system's mtime granularity, with the same sizes.
_intact: set[tuple] = set()


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint `path` cannot be read back intact, or None if every tensor reads.

    Reads every tensor once: TensorFlow checks each tensor's CRC32C (flipped bytes) and
    the index's block checksums, and a truncated data file gives a short read.
    """
    name = os.path.basename(path)
    if not tf.io.gfile.exists(path + ".index"):
        return f"{name}.index is missing"
    key = (path, *(_file_identity(f) for f in sorted(tf.io.gfile.glob(path + ".*"))))
    if key in _intact:
        return None
    problem = _read_every_tensor(path)
    if problem is None:
        _intact.add(key)
    return problem


def _file_identity(filename: str) -> tuple:
    """Size and modification time; on local disks also inode and change time."""
    if "://" not in filename:
        stat = os.stat(filename)
        return (filename, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    stat = tf.io.gfile.stat(filename)
    return (filename, stat.length, stat.mtime_nsec)


def _read_every_tensor(path: str) -> str | None:
    name = os.path.basename(path)
    try:
        reader = tf.train.load_checkpoint(path)
    except tf.errors.OpError as error:
        return f"{name}.index is damaged: {_first_line(error.message)}"
    try:
        for key in reader.get_variable_to_shape_map():  # the object graph too
            reader.get_tensor(key)
    except IndexError as error:  # TF's reader says "Read less bytes than requested"
        return f"its data file is shorter than its index says, e.g. truncated: {error}"
    except tf.errors.OpError as error:
        # "TensorBundle at <path> shard 0 (9216 bytes): Checksum does not match: ..."
        message = re.sub(r"^TensorBundle at .* bytes\): ", "", _first_line(error.message))
        return f"tensor {key}: {message}"
    return None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
