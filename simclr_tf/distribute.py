"""Picks the `tf.distribute` strategy: TPU, GPUs (mirrored) or the default (CPU)."""

from __future__ import annotations

from absl import logging
import tensorflow as tf

from simclr_tf.config import RuntimeConfig


def build_strategy(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    """TPUStrategy when `use_tpu`, MirroredStrategy on GPUs, else the default strategy."""
    if runtime.use_tpu:
        return _tpu_strategy(runtime)
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        strategy = tf.distribute.MirroredStrategy([g.name for g in gpus])
        logging.info("MirroredStrategy over %d GPU(s)", strategy.num_replicas_in_sync)
        return strategy
    logging.info("No GPU or TPU requested/found: default strategy on the CPU")
    return tf.distribute.get_strategy()


def _tpu_strategy(runtime: RuntimeConfig) -> tf.distribute.TPUStrategy:
    # As the original: an explicit TPU name (with zone/project) wins over --master.
    if runtime.tpu_name:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            runtime.tpu_name, zone=runtime.tpu_zone, project=runtime.gcp_project
        )
    else:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(runtime.master or "")
    tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
    logging.info(
        "TPU topology: %d task(s), %d TPU(s) per task",
        topology.num_tasks,
        topology.num_tpus_per_task,
    )
    return tf.distribute.TPUStrategy(resolver)
