"""The `tf.distribute` strategy factory, and who writes files in a multi-worker run.

`--strategy` (RuntimeConfig.strategy) picks one of `STRATEGY_BUILDERS`; "auto" follows
`choose_strategy`: a TPU with `--use_tpu`, MultiWorkerMirroredStrategy when the
`TF_CONFIG` environment variable describes a cluster of several tasks, MirroredStrategy
over the GPUs, else the default strategy (one device).

In a multi-worker run every worker executes the same steps (collectives need all of
them), but only the chief writes: summaries go to a no-op writer elsewhere, and the
other workers write their checkpoints to a temporary directory that is deleted at once
(as TensorFlow's multi-worker guide does, since saving may involve collectives).
Resuming reads the chief's checkpoints in `model_dir`, which every worker must see
(a shared file system or a bucket).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

from absl import logging
import tensorflow as tf

from simclr_tf.config import RuntimeConfig


def cluster_size(tf_config: Mapping | None) -> int:
    """Number of chief + worker tasks in a parsed TF_CONFIG (0 without a cluster)."""
    cluster = (tf_config or {}).get("cluster", {})
    return sum(len(cluster.get(job, ())) for job in ("chief", "worker"))


def read_tf_config(environ: Mapping[str, str] = os.environ) -> dict:
    """The parsed `TF_CONFIG` environment variable, {} when unset."""
    text = environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from None


def choose_strategy(runtime: RuntimeConfig, *, tf_config: Mapping | None, num_gpus: int) -> str:
    """The name of the strategy `build_strategy` builds (see the module docstring)."""
    if runtime.use_tpu:  # validate() rejects --use_tpu with another --strategy
        return "tpu"
    if runtime.strategy != "auto":
        return runtime.strategy
    if cluster_size(tf_config) > 1:
        return "multi_worker"
    return "mirrored" if num_gpus else "default"


def build_strategy(
    runtime: RuntimeConfig, environ: Mapping[str, str] = os.environ
) -> tf.distribute.Strategy:
    """Builds the strategy `choose_strategy` names.

    Build it before running any TensorFlow op: MultiWorkerMirroredStrategy and the TPU
    system can only be set up before the runtime starts.
    """
    num_gpus = len(tf.config.list_physical_devices("GPU"))
    name = choose_strategy(runtime, tf_config=read_tf_config(environ), num_gpus=num_gpus)
    strategy = STRATEGY_BUILDERS[name](runtime)
    logging.info(
        "Strategy %s (--strategy=%s): %d replica(s) in sync",
        type(strategy).__name__,
        runtime.strategy,
        strategy.num_replicas_in_sync,
    )
    return strategy


def _default(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    del runtime
    return tf.distribute.get_strategy()


def _mirrored(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    del runtime
    # All local GPUs, or the CPU when there are none.
    return tf.distribute.MirroredStrategy()


def _multi_worker(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    del runtime
    # The cluster and this process's task come from TF_CONFIG.
    return tf.distribute.MultiWorkerMirroredStrategy()


def tpu_cluster_resolver(runtime: RuntimeConfig) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    # As the original: an explicit TPU name (with zone/project) wins over --master.
    if runtime.tpu_name:
        return tf.distribute.cluster_resolver.TPUClusterResolver(
            runtime.tpu_name, zone=runtime.tpu_zone, project=runtime.gcp_project
        )
    return tf.distribute.cluster_resolver.TPUClusterResolver(runtime.master or "")


def _tpu(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    resolver = tpu_cluster_resolver(runtime)
    tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
    logging.info(
        "TPU topology: %d task(s), %d TPU(s) per task",
        topology.num_tasks,
        topology.num_tpus_per_task,
    )
    return tf.distribute.TPUStrategy(resolver)


STRATEGY_BUILDERS: dict[str, Callable[[RuntimeConfig], tf.distribute.Strategy]] = {
    "default": _default,
    "mirrored": _mirrored,
    "multi_worker": _multi_worker,
    "tpu": _tpu,
}


def is_chief_task(tf_config: Mapping | None) -> bool:
    """Whether this TF_CONFIG task is its cluster's chief: the "chief" task, else worker 0."""
    if cluster_size(tf_config) <= 1:
        return True
    cluster, task = tf_config["cluster"], tf_config.get("task", {})
    if cluster.get("chief"):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def writes_model_dir(runtime: RuntimeConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process writes model_dir's checkpoints; known before the strategy is built."""
    tf_config = read_tf_config(environ)
    # Only a multi-worker strategy has non-chief processes; which one is independent of GPUs.
    if choose_strategy(runtime, tf_config=tf_config, num_gpus=0) != "multi_worker":
        return True
    return is_chief_task(tf_config)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints and summaries (always, without a cluster)."""
    return bool(strategy.extended.should_checkpoint)


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", None) or 0)


def summary_writer(model_dir: str, strategy: tf.distribute.Strategy) -> tf.summary.SummaryWriter:
    """A file writer into `model_dir` on the chief, a no-op writer on the other workers."""
    if strategy.extended.should_save_summary:
        return tf.summary.create_file_writer(model_dir)
    return tf.summary.create_noop_writer()


def save_checkpoint(
    manager: tf.train.CheckpointManager, step: int, strategy: tf.distribute.Strategy
) -> str | None:
    """Saves on the chief (returns the path); elsewhere writes a throw-away copy (None)."""
    if is_chief(strategy):
        return manager.save(checkpoint_number=step)
    temp_dir = os.path.join(manager.directory, f".worker{task_id(strategy)}_tmp")
    manager.checkpoint.write(os.path.join(temp_dir, "ckpt"))
    tf.io.gfile.rmtree(temp_dir)
    return None
