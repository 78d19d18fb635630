"""A run's flags for TensorBoard's HParams dashboard, so runs under one logdir compare as rows.

Each model_dir holds one HParams "session": its config flattened to `<section>/<flag>`
(`hparams_of`), in an event file of its own (`events.out.tfevents.*.hparams`). TensorBoard
makes each session one row of its HParams table, and the last value of every scalar in
that model_dir (and its subdirectories, e.g. `eval_<eval_name>/`) a metric column:
`eval/label_top_1_accuracy`, `eval/knn_top_1_accuracy`, `train/total_loss` (the final
training loss), ...

No experiment-level `hparams_config` is written, on purpose: TensorBoard (2.21) takes the
first one it finds in any run as the schema of the whole table, so one run's metric set
would hide another's columns, and a declared schema loses the "differs" marks by which
TensorBoard lists (and shows by default) the flags that differ between the runs. Without
it, the columns are the union over all runs.

TensorBoard silently keeps the first session it reads in a directory, so a model_dir must
hold exactly one, and the right one: `write_session` writes it when there is none; a
training run whose flags differ from the recorded ones (resumed with, say, more
--train_steps) replaces it, and an eval run never does. Only the chief writes.
"""

from __future__ import annotations

import os
from typing import Union

from absl import logging
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import metadata
import tensorflow as tf

from simclr_tf.config import Config

HParamValue = Union[bool, int, float, str]

# The session's event file: its own, so it can be found and replaced without reading
# the (large) training event files.
FILE_SUFFIX = ".hparams"
# How the command ran, not what was trained: a --mode=eval of a model_dir, or a resumed
# --mode=train_then_eval, has the same hyper-parameters as the run that trained it.
EXCLUDED = frozenset({"train/mode"})


def hparams_of(config: Config) -> dict[str, HParamValue]:
    """`{"<section>/<flag>": value}` of every config field; fields left at None are omitted."""
    values: dict[str, HParamValue] = {}
    for section, fields in config.to_dict().items():
        for name, value in fields.items():
            key = f"{section}/{name}"
            if value is None or key in EXCLUDED:
                continue
            # Every field is a bool, int, float or str today; anything else is shown as text.
            values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


def session_files(model_dir: str) -> list[str]:
    return sorted(tf.io.gfile.glob(os.path.join(model_dir, f"events.out.tfevents.*{FILE_SUFFIX}")))


def read_sessions(path: str) -> list[tuple[str, dict[str, HParamValue]]]:
    """(trial id, hparams) of each HParams session in one event file."""
    sessions = []
    for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
            plugin = value.metadata.plugin_data
            if plugin.plugin_name != metadata.PLUGIN_NAME or value.tag != metadata.SESSION_START_INFO_TAG:
                continue
            info = metadata.parse_session_start_info_plugin_data(plugin.content)
            sessions.append((info.group_name, {k: _python_value(v) for k, v in info.hparams.items()}))
    return sessions


def _python_value(value) -> HParamValue:
    kind = value.WhichOneof("kind")
    return {"bool_value": value.bool_value, "number_value": value.number_value,
            "string_value": value.string_value}[kind]


def trial_id(model_dir: str) -> str:
    """The session's name in the table: the model_dir, so two runs of equal flags are two rows."""
    # TensorBoard groups sessions by this name; it defaults to a hash of the hparams.
    return model_dir.rstrip("/") if "://" in model_dir else os.path.abspath(model_dir)


def write_session(config: Config, model_dir: str, strategy: tf.distribute.Strategy) -> bool:
    """Records `config` as model_dir's HParams session (see the module docstring).

    Returns whether a session was written.
    """
    if not strategy.extended.should_save_summary:
        return False
    wanted = (trial_id(model_dir), hparams_of(config))
    existing = session_files(model_dir)
    if existing:
        if config.train.mode == "eval" or _holds_only(existing, wanted):
            return False
        logging.info("The flags differ from %s's recorded HParams session: replacing it", model_dir)
        # Removed first: a crash before the new one is written leaves none, which the
        # next run writes, rather than two that TensorBoard would pick from.
        for path in existing:
            tf.io.gfile.remove(path)
    writer = tf.summary.create_file_writer(model_dir, filename_suffix=FILE_SUFFIX)
    with writer.as_default():
        hp.hparams(wanted[1], trial_id=wanted[0])
    writer.close()
    return True


def _holds_only(paths: list[str], wanted: tuple[str, dict[str, HParamValue]]) -> bool:
    """Whether `paths` hold exactly one session, `wanted`; an unreadable file does not count."""
    try:
        sessions = [session for path in paths for session in read_sessions(path)]
    except tf.errors.OpError as error:  # e.g. truncated by a crash
        logging.warning("Cannot read the HParams session in %s (%s); writing it again", paths, error)
        return False
    return sessions == [wanted]
