"""Resuming after a crash: the data continues where it was, and a SIGKILLed run finishes on restart."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import simclr_tf.data
from simclr_tf.config import Config
from simclr_tf.data import build_dataset, get_source
from simclr_tf.data.pipeline import epoch_stream
from simclr_tf.train import checkpoints, train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment


def _deterministic(ds):
    # The training pipeline allows reordering for speed; the tests compare orders.
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def test_epoch_stream_order_depends_only_on_seed_and_epoch():
    ds = tf.data.Dataset.range(10)
    full = list(epoch_stream(ds, buffer_size=10, seed=3, epoch_size=10).take(40).as_numpy_iterator())
    epochs = [full[i : i + 10] for i in range(0, 40, 10)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4, "each epoch has its own order"
    # A new stream started at example 23 (epoch 2, position 3) continues the first one.
    resumed = epoch_stream(ds, buffer_size=10, seed=3, epoch_size=10, start_example=23)
    assert list(resumed.take(17).as_numpy_iterator()) == full[23:40]
    other_seed = epoch_stream(ds, buffer_size=10, seed=4, epoch_size=10)
    assert list(other_seed.take(10).as_numpy_iterator()) != full[:10]
    with pytest.raises(ValueError, match="empty"):
        epoch_stream(ds.take(0), buffer_size=10, seed=3, epoch_size=0)


@pytest.mark.parametrize("global_seed", [0, 5])
def test_epoch_stream_order_ignores_the_global_seed(global_seed):
    # A global seed of 0 used to crash the tensor-seeded shuffle; any global seed must
    # leave the (seed, epoch) order alone, or a resumed notebook run would read other data.
    ds = tf.data.Dataset.range(10)
    unseeded = list(epoch_stream(ds, buffer_size=10, seed=3, epoch_size=10).take(20).as_numpy_iterator())
    tf.random.set_seed(global_seed)
    seeded = list(epoch_stream(ds, buffer_size=10, seed=3, epoch_size=10).take(20).as_numpy_iterator())
    assert seeded == unseeded


def test_resumed_training_batches_continue_the_interrupted_order(tmp_path):
    # Constant grey images whose level is the example index survive crop and flip.
    for i in range(10):
        path = tmp_path / "train" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6 + i, 5), (20 * i,) * 3).save(path)
    source = get_source(f"folder:{tmp_path}")

    def indices(start_example, batches):
        ds = build_dataset(
            source, split="train", batch_size=4, is_training=True, num_views=1, image_size=8,
            color_jitter_strength=0.0, use_blur=False, cache=True, shuffle_seed=7,
            start_example=start_example,
        )
        images = [b["image"].numpy() for b in _deterministic(ds).take(batches)]
        return list(np.rint(np.concatenate(images).mean(axis=(1, 2, 3)) * 255 / 20).astype(int))

    uninterrupted = indices(0, 8)  # 32 examples: epochs 0-2 and 2 of epoch 3
    assert sorted(uninterrupted[10:20]) == list(range(10))
    # A run that stopped after 3 steps of batch 4 (epoch 1, position 2) resumes there.
    assert indices(12, 5) == uninterrupted[12:32]


def test_a_resumed_run_reads_the_data_from_the_restored_step(tmp_path, monkeypatch):
    config = Config.demo().replace(
        model={"resnet_depth": 10, "image_size": 16, "num_proj_layers": 1, "proj_out_dim": 16},
        data={"train_split": "train[:64]", "eval_split": "validation[:16]"},
        train={"mode": "train", "train_steps": 2, "train_batch_size": 16, "checkpoint_steps": 2,
               "keep_hub_module_max": 0},
    )
    train_and_evaluate(config, str(tmp_path))
    starts = []
    build = simclr_tf.data.build_dataset

    def spy(*args, **kwargs):
        if kwargs["is_training"]:
            starts.append(kwargs["start_example"])
        return build(*args, **kwargs)

    monkeypatch.setattr(simclr_tf.data, "build_dataset", spy)
    experiment = Experiment.create(config.replace(train={"train_steps": 3}), str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "model_dir"
    trainer.train(experiment, state)
    # The summary images read from the start; the training stream after 2 steps of 16.
    assert starts[-1] == 2 * 16
    assert int(state.optimizer.iterations.numpy()) == 3


def _command(command, model_dir):
    # A checkpoint every 2 steps, the last 3 kept.
    return command(model_dir, optimizer="momentum", learning_rate=0.1, train_steps=24, checkpoint_steps=2,
                   keep_checkpoint_max=3)


def _step_of(path):
    return int(path.rsplit("-", 1)[1])


def _stored_iterations(path):
    paths = checkpoints.checkpoint_variables_by_path(path, root="optimizer")
    (key, _), = [value for name, value in paths.items() if name.endswith("iterations")]
    return int(tf.train.load_checkpoint(path).get_tensor(key))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_final_step(tmp_path, tiny_run_command):
    model_dir = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_command(tiny_run_command, model_dir), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            # Kill as soon as the first checkpoint is listed, wherever training then is.
            deadline = time.monotonic() + 600
            while tf.train.latest_checkpoint(str(model_dir)) is None:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint written"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    killed_at = _step_of(tf.train.latest_checkpoint(str(model_dir)))
    assert killed_at < 24

    second = subprocess.run(_command(tiny_run_command, model_dir), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {model_dir}/ckpt-{killed_at}" in second.stderr
    # 64 examples per epoch, 16 per step.
    assert f"the training data continues in epoch {killed_at * 16 // 64}" in second.stderr

    state = tf.train.get_checkpoint_state(str(model_dir))
    assert _step_of(state.model_checkpoint_path) == 24
    assert [_step_of(p) for p in state.all_model_checkpoint_paths] == [20, 22, 24]
    for path in state.all_model_checkpoint_paths:  # every listed checkpoint reads in full
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_shape_map():
            value = np.asarray(reader.get_tensor(key))
            assert value.dtype.kind not in "fc" or np.isfinite(value).all(), key
        assert _stored_iterations(path) == _step_of(path)
    assert os.path.exists(model_dir / "config.json")
