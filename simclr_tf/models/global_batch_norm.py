"""Cross-replica (global) batch norm whose all-reduces pair up by layer on every replica.

Keras' `BatchNormalization(synchronized=True)` all-reduces three tensors per layer, and
the gradient of each all-reduce is another all-reduce, issued when backprop reaches
it. Under MirroredStrategy (and MultiWorkerMirroredStrategy) each replica traces its
own backward pass, and all-reduces are matched by the order in which each replica
issues them. Backprop may visit parallel branches (a residual block's projection
shortcut and main path, selective-kernel paths) in a different order on different
replicas, and same-shaped statistics of two layers are then summed together: the
update is silently wrong (tests/train/test_replica_equivalence.py saw relative
differences of 1e-3 to 2e-1 from the one-replica step in about 1 run in 10).

Here each layer all-reduces a single vector `[sum, sum of squares, count, token]`,
where `token` is the last entry of the previous global batch norm's reduced vector on
this replica in this graph (always 0). The chain makes every layer's reduction depend
on the one before it, so backprop reaches the reductions in exactly the reverse of
their forward order on every replica: they pair up layer by layer, and also launch
in one order on every device (which NCCL needs).
"""

from __future__ import annotations

import threading
import weakref

import keras
import tensorflow as tf

# graph -> {replica id: the last reduced token}; eager mode uses the key None.
_TOKENS: "weakref.WeakKeyDictionary | dict" = weakref.WeakKeyDictionary()
_EAGER_TOKENS: dict = {}
_LOCK = threading.Lock()  # MirroredStrategy traces its replicas in threads


def _token_store() -> dict:
    if tf.executing_eagerly():
        return _EAGER_TOKENS
    graph = tf.compat.v1.get_default_graph()
    with _LOCK:
        return _TOKENS.setdefault(graph, {})


def _replica_key(context: tf.distribute.ReplicaContext):
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    return None if replica_id is None else int(replica_id)  # None: traced once (TPU)


def cross_replica_moments(x: tf.Tensor, axes) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and (biased) variance of `x` over `axes` and over all replicas, float32.

    One all-reduce per call, chained to the previous call on this replica (see the
    module docstring). Without a replica context, or with one replica, the local moments.
    """
    x = tf.cast(x, tf.float32)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.nn.moments(x, axes)
    axes = [a % len(x.shape) for a in axes]
    local_sum = tf.reshape(tf.reduce_sum(x, axis=axes), [-1])
    local_squares = tf.reshape(tf.reduce_sum(tf.square(x), axis=axes), [-1])
    local_count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    store, key = _token_store(), _replica_key(context)
    token = store.get(key, tf.zeros([], tf.float32))
    packed = tf.concat([local_sum, local_squares, tf.stack([local_count, token])], axis=0)
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, packed)
    store[key] = total[-1]
    size = local_sum.shape[0] if local_sum.shape[0] is not None else tf.size(local_sum)
    count = total[-2]
    mean = tf.math.divide_no_nan(total[:size], count)
    mean_of_squares = tf.math.divide_no_nan(total[size:2 * size], count)
    variance = tf.maximum(mean_of_squares - tf.square(mean), 0.0)  # one pass, as Keras
    shape = [x.shape[i] if x.shape[i] is not None else -1 for i in range(len(x.shape)) if i not in axes]
    return tf.reshape(mean, shape), tf.reshape(variance, shape)


@keras.saving.register_keras_serializable(package="simclr_tf")
class GlobalBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization(synchronized=True)` with `cross_replica_moments`.

    Same variables, names, config and results as the Keras layer; only the pairing of
    the replicas' reductions differs.
    """

    def _moments(self, inputs, mask):
        if not self.synchronized or mask is not None:
            return super()._moments(inputs, mask)
        mean, variance = cross_replica_moments(inputs, self._reduction_axes)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)
