"""WarmUpAndCosineDecay against the formula written out in NumPy."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.optim import WarmUpAndCosineDecay, scaled_learning_rate


def reference_lr(step, *, scaled, warmup, total):
    if warmup and step < warmup:
        return step / warmup * scaled
    decay_steps = total - warmup
    progress = min(step - warmup, decay_steps) / decay_steps
    return 0.5 * scaled * (1.0 + np.cos(np.pi * progress))


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(0.3 * 16)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        scaled_learning_rate(0.1, 256, "cubic")
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        WarmUpAndCosineDecay(0.1, 256, "cubic", warmup_steps=1, total_steps=10)


@pytest.mark.parametrize(
    "scaling,expected_scaled", [("linear", 0.3 * 512 / 256), ("sqrt", 0.3 * math.sqrt(512))]
)
def test_values_at_key_steps(scaling, expected_scaled):
    warmup, total = 10, 110
    schedule = WarmUpAndCosineDecay(0.3, 512, scaling, warmup_steps=warmup, total_steps=total)
    # Start, mid-warm-up, end of warm-up (peak), mid-decay, end, past the end.
    expected = {0: 0.0, 5: 0.5 * expected_scaled, 10: expected_scaled, 60: 0.5 * expected_scaled,
                110: 0.0, 150: 0.0}
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-7, err_msg=str(step))
    for step in (1, 7, 9, 11, 35, 85, 109):
        np.testing.assert_allclose(
            float(schedule(step)),
            reference_lr(step, scaled=expected_scaled, warmup=warmup, total=total),
            rtol=1e-5,
            atol=1e-7,
            err_msg=str(step),
        )


def test_zero_warmup_starts_at_peak():
    schedule = WarmUpAndCosineDecay(0.1, 256, "linear", warmup_steps=0, total_steps=100)
    for step in (0, 1, 25, 50, 100):
        np.testing.assert_allclose(
            float(schedule(step)), reference_lr(step, scaled=0.1, warmup=0, total=100), rtol=1e-6, atol=1e-8
        )
    assert float(schedule(0)) == pytest.approx(0.1)


def test_accepts_int64_variable_step_in_graph():
    # Keras optimizers call the schedule with their int64 `iterations` variable.
    schedule = WarmUpAndCosineDecay(0.2, 256, "linear", warmup_steps=4, total_steps=20)
    step = tf.Variable(2, dtype=tf.int64)
    value = tf.function(lambda: schedule(step))()
    assert value.dtype == tf.float32
    np.testing.assert_allclose(value.numpy(), 0.1, rtol=1e-6)


def test_invalid_steps():
    with pytest.raises(ValueError):
        WarmUpAndCosineDecay(0.1, 256, "linear", warmup_steps=-1, total_steps=10)
    with pytest.raises(ValueError):
        WarmUpAndCosineDecay(0.1, 256, "linear", warmup_steps=11, total_steps=10)
    # total == warmup: no decay phase, but no NaN either.
    schedule = WarmUpAndCosineDecay(0.1, 256, "linear", warmup_steps=10, total_steps=10)
    assert np.isfinite(float(schedule(10)))


def test_get_config_round_trip():
    schedule = WarmUpAndCosineDecay(0.3, 1024, "sqrt", warmup_steps=7, total_steps=70, name="lr")
    config = schedule.get_config()
    clone = WarmUpAndCosineDecay.from_config(config)
    assert clone.get_config() == config
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(again, WarmUpAndCosineDecay)
    for step in (0, 3, 7, 40, 70):
        assert float(clone(step)) == pytest.approx(float(schedule(step)))
        assert float(again(step)) == pytest.approx(float(schedule(step)))
