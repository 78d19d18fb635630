"""LARS against a NumPy transcription of the original algorithm (tf2/lars_optimizer.py)."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.optim import LARS, WarmUpAndCosineDecay

MOMENTUM, WEIGHT_DECAY, EETA = 0.9, 0.05, 0.01
EXCLUDE = ["batch_norm", "bias"]


def lars_reference(w, grads, lrs, *, decay, adapt, nesterov=False, classic=True, weight_decay=WEIGHT_DECAY):
    """Runs len(grads) LARS updates on one variable in float64; returns (w, momentum)."""
    w = w.astype(np.float64)
    v = np.zeros_like(w)

    def trust(direction):
        w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(direction)
        return EETA * w_norm / d_norm if adapt and w_norm > 0 and d_norm > 0 else 1.0

    for g, lr in zip(grads, lrs):
        g = g.astype(np.float64)
        if decay and weight_decay:
            g = g + weight_decay * w
        if classic:
            scaled_lr = lr * trust(g)
            v = MOMENTUM * v + scaled_lr * g
            w = w - (MOMENTUM * v + scaled_lr * g if nesterov else v)
        else:
            v = MOMENTUM * v + g
            update = MOMENTUM * v + g if nesterov else v
            w = w - lr * trust(update) * update
    return w, v


def make_variable(path, value):
    *scopes, leaf = path.split("/")
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(keras.name_scope(scope))
        variable = keras.Variable(np.asarray(value, np.float32), name=leaf)
    assert variable.path == path
    return variable


# (path, decayed, adapted) under EXCLUDE.
CASES = [
    ("block/conv2d/kernel", True, True),
    ("block/batch_norm/gamma", False, False),
    ("head/dense/bias", False, False),
]


def _setup(seed, steps):
    rng = np.random.default_rng(seed)
    inits = [rng.normal(size=(3, 4)), rng.normal(size=(4,)) + 1.0, rng.normal(size=(4,))]
    grads = [[rng.normal(size=x.shape).astype(np.float32) for x in inits] for _ in range(steps)]
    return [x.astype(np.float32) for x in inits], grads


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize(
    "nesterov,classic", [(False, True), (True, True), (False, False), (True, False)]
)
def test_lars_matches_reference(steps, nesterov, classic):
    inits, grads = _setup(steps + 10 * nesterov + 20 * classic, steps)
    variables = [make_variable(path, x) for (path, _, _), x in zip(CASES, inits)]
    opt = LARS(
        0.5,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        eeta=EETA,
        nesterov=nesterov,
        classic_momentum=classic,
        exclude_from_weight_decay=EXCLUDE,
    )
    for step_grads in grads:
        opt.apply_gradients(zip([tf.constant(g) for g in step_grads], variables))

    for i, (path, decay, adapt) in enumerate(CASES):
        ref_w, ref_v = lars_reference(
            inits[i],
            [g[i] for g in grads],
            [0.5] * steps,
            decay=decay,
            adapt=adapt,
            nesterov=nesterov,
            classic=classic,
        )
        np.testing.assert_allclose(variables[i].numpy(), ref_w, rtol=1e-5, atol=1e-7, err_msg=path)
        np.testing.assert_allclose(opt.momentums[i].numpy(), ref_v, rtol=1e-5, atol=1e-7, err_msg=path)
    assert int(opt.iterations) == steps


def test_reference_cases_differ():
    """Guards the test above: decay and adaptation must change the result there."""
    inits, grads = _setup(0, 3)
    g = [s[0] for s in grads]
    plain, _ = lars_reference(inits[0], g, [0.5] * 3, decay=False, adapt=False)
    for decay, adapt in [(True, False), (False, True), (True, True)]:
        other, _ = lars_reference(inits[0], g, [0.5] * 3, decay=decay, adapt=adapt)
        assert not np.allclose(plain, other, rtol=1e-3)


def test_layer_adaptation_exclusion_is_separate():
    rng = np.random.default_rng(5)
    w0, g = rng.normal(size=(5,)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)
    bias = make_variable("dense/bias", w0)
    opt = LARS(0.5, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eeta=EETA,
               exclude_from_weight_decay=["bias"], exclude_from_layer_adaptation=[])
    opt.apply_gradients([(tf.constant(g), bias)])
    ref, _ = lars_reference(w0, [g], [0.5], decay=False, adapt=True)
    np.testing.assert_allclose(bias.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("classic", [True, False])
def test_zero_weights_and_zero_grads(classic):
    rng = np.random.default_rng(6)
    g = rng.normal(size=(2, 3)).astype(np.float32)
    w = rng.normal(size=(2, 3)).astype(np.float32)
    zero = np.zeros((2, 3), np.float32)
    cases = [  # (path, init, grad)
        ("a/zero_w/kernel", zero, g),   # ||w|| = 0 -> trust 1
        ("a/zero_g/kernel", w, zero),   # only the decay term moves it
        ("a/zero_both/kernel", zero, zero),
    ]
    for weight_decay in (0.0, WEIGHT_DECAY):
        variables = [make_variable(p, x) for p, x, _ in cases]
        opt = LARS(0.5, momentum=MOMENTUM, weight_decay=weight_decay, eeta=EETA, classic_momentum=classic)
        for _ in range(2):
            opt.apply_gradients([(tf.constant(grad), v) for (_, _, grad), v in zip(cases, variables)])
        for (path, init, grad), v in zip(cases, variables):
            ref, _ = lars_reference(init, [grad] * 2, [0.5] * 2, decay=True, adapt=True,
                                    classic=classic, weight_decay=weight_decay)
            assert np.all(np.isfinite(v.numpy())), path
            np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-7, err_msg=path)


def test_schedule_inside_tf_function():
    # Learning rate from a schedule evaluated at the optimizer's iteration, in a graph.
    schedule = WarmUpAndCosineDecay(0.1, 512, "linear", warmup_steps=2, total_steps=6)
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(4, 2)).astype(np.float32)
    grads = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(4)]
    kernel = make_variable("dense/kernel", w0)
    opt = LARS(schedule, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eeta=EETA)

    @tf.function
    def apply(g):
        opt.apply_gradients([(g, kernel)])

    for g in grads:
        apply(tf.constant(g))
    lrs = [float(schedule(step)) for step in range(4)]
    assert lrs[0] == 0.0 and lrs[1] > 0 and lrs[3] < lrs[2]
    ref, _ = lars_reference(w0, grads, lrs, decay=True, adapt=True)
    np.testing.assert_allclose(kernel.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_base_class_decay_is_off():
    opt = LARS(0.1, weight_decay=1e-4)
    assert opt.weight_decay == 1e-4
    bn = make_variable("batch_norm/gamma", np.ones((3,), np.float32))
    LARS(0.1, momentum=0.0, weight_decay=0.5, exclude_from_weight_decay=["batch_norm"]).apply_gradients(
        [(tf.zeros((3,)), bn)]
    )
    # Excluded and zero gradient: nothing may move it (decoupled decay would).
    np.testing.assert_array_equal(bn.numpy(), np.ones((3,), np.float32))


def test_mirrored_step_equals_single_device(two_cpu_strategy):
    strategy = two_cpu_strategy
    rng = np.random.default_rng(8)
    inits = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
    paths = ["block/conv2d/kernel", "block/batch_norm/beta"]
    # Different gradients on each replica; Keras sums them across replicas.
    per_replica = [[rng.normal(size=x.shape).astype(np.float32) for x in inits] for _ in range(2)]
    summed = [per_replica[0][i] + per_replica[1][i] for i in range(2)]
    kwargs = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eeta=EETA, exclude_from_weight_decay=EXCLUDE)

    with strategy.scope():
        dist_vars = [make_variable(p, x) for p, x in zip(paths, inits)]
        dist_opt = LARS(0.5, **kwargs)
        dist_opt.build(dist_vars)
    dist_grads = strategy.experimental_distribute_values_from_function(
        lambda ctx: [tf.constant(g) for g in per_replica[ctx.replica_id_in_sync_group]]
    )

    @tf.function
    def dist_step(grads):
        strategy.run(lambda g: dist_opt.apply_gradients(zip(g, dist_vars)), args=(grads,))

    dist_step(dist_grads)

    single_vars = [make_variable(p, x) for p, x in zip(paths, inits)]
    LARS(0.5, **kwargs).apply_gradients(zip([tf.constant(g) for g in summed], single_vars))

    for i, (path, single) in enumerate(zip(paths, single_vars)):
        for local in strategy.experimental_local_results(dist_vars[i].value):
            np.testing.assert_allclose(local.numpy(), single.numpy(), rtol=1e-6, err_msg=path)
        ref, _ = lars_reference(inits[i], [summed[i]], [0.5], decay=i == 0, adapt=i == 0)
        np.testing.assert_allclose(single.numpy(), ref, rtol=1e-5, atol=1e-7)
    for local in strategy.experimental_local_results(dist_opt.momentums[0].value):
        np.testing.assert_allclose(local.numpy(), dist_opt.momentums[0].numpy())
    assert int(dist_opt.iterations.numpy()) == 1


def test_checkpoint_restores_momentum(tmp_path):
    rng = np.random.default_rng(9)
    inits = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
    paths = ["dense/kernel", "dense/bias"]
    grads = [[rng.normal(size=x.shape).astype(np.float32) for x in inits] for _ in range(3)]

    def fresh():
        variables = [make_variable(p, x) for p, x in zip(paths, inits)]
        return variables, LARS(0.3, weight_decay=WEIGHT_DECAY, exclude_from_weight_decay=EXCLUDE)

    variables, opt = fresh()
    for g in grads[:2]:
        opt.apply_gradients(zip(g, variables))
    path = tf.train.Checkpoint(optimizer=opt, variables=variables).save(str(tmp_path / "ckpt"))
    saved_momentums = [m.numpy() for m in opt.momentums]
    assert all(np.any(m != 0) for m in saved_momentums)
    opt.apply_gradients(zip(grads[2], variables))

    # Restore before the optimizer is built (deferred) and after (immediate).
    for build_first in (False, True):
        restored_vars, restored = fresh()
        if build_first:
            restored.build(restored_vars)
        status = tf.train.Checkpoint(optimizer=restored, variables=restored_vars).restore(path)
        if not build_first:
            restored.build(restored_vars)
        status.assert_consumed()
        assert int(restored.iterations) == 2
        for m, saved in zip(restored.momentums, saved_momentums):
            np.testing.assert_array_equal(m.numpy(), saved)
        # The third step from the restored state matches the uninterrupted run.
        restored.apply_gradients(zip(grads[2], restored_vars))
        for a, b in zip(restored_vars, variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_get_config_round_trip():
    schedule = WarmUpAndCosineDecay(0.3, 1024, "sqrt", warmup_steps=5, total_steps=50)
    opt = LARS(schedule, momentum=0.8, weight_decay=1e-6, eeta=0.002, nesterov=True, classic_momentum=False,
               exclude_from_weight_decay=["bias"], exclude_from_layer_adaptation=["batch_norm"], clipnorm=1.0)
    config = opt.get_config()
    clone = LARS.from_config(config)
    assert clone.get_config() == config
    for key, value in dict(momentum=0.8, weight_decay=1e-6, eeta=0.002, nesterov=True, classic_momentum=False,
                           exclude_from_weight_decay=["bias"], exclude_from_layer_adaptation=["batch_norm"],
                           clipnorm=1.0).items():
        assert config[key] == value, key
    assert isinstance(clone._learning_rate, WarmUpAndCosineDecay)
    for step in (0, 3, 20):
        assert float(clone._learning_rate(step)) == pytest.approx(float(schedule(step)))
    # Generic Keras (de)serialisation finds the registered class too.
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, LARS) and again.get_config() == config
