"""SIGTERM saves a checkpoint at the current step and stops; the same command resumes from it."""

import os
import re
import signal
import subprocess
import time

import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.train import checkpoints, preemption, train_and_evaluate, trainer


def test_sigterm_flag_replaces_the_handler_only_while_entered():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.SigtermFlag() as sigterm:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert sigterm.received
    assert signal.getsignal(signal.SIGTERM) is before


def test_call_length_keeps_calls_near_the_target_time():
    length = preemption.CallLength(seconds=5.0)
    assert length.steps == 1
    assert length.update(1, 20.0) == 1  # the first call traced: never below one step
    assert length.update(1, 0.1) == 50
    assert length.update(50, 10.0) == 25


def test_is_event():
    assert trainer.is_event(10, 10, 100, 100)  # the end
    assert trainer.is_event(4, 10, 4, 0) and trainer.is_event(5, 10, 0, 5)
    assert not trainer.is_event(3, 10, 4, 5) and not trainer.is_event(3, 10, 0, 0)


def test_sigterm_between_events_saves_at_that_step_without_export_or_eval(tmp_path, monkeypatch):
    # Log and checkpoint intervals beyond the end: only the bounded call length lets the
    # loop see the signal before the last step.
    config = Config().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 1,
               "proj_out_dim": 16},
        data={"dataset": "mnist5k", "train_split": "train[:64]", "eval_split": "validation[:16]",
              "use_blur": False, "cache_dataset": True},
        optim={"warmup_epochs": 0},
        train={"mode": "train_then_eval", "train_mode": "pretrain", "train_steps": 6, "train_batch_size": 16,
               "checkpoint_steps": 100, "log_every_steps": 100, "keep_hub_module_max": 1},
    )
    calls = []

    def one_step_calls(self, steps, elapsed):
        calls.append(steps)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the loop runs, as a preemption
            time.sleep(0.2)  # another thread may take it: let the main thread run the handler
        self.steps = 1
        return 1

    monkeypatch.setattr(preemption.CallLength, "update", one_step_calls)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted) as error:
        train_and_evaluate(config, str(tmp_path))
    assert str(error.value) == (
        f"Preempted (SIGTERM) at step 2: saved {tmp_path}/ckpt-2; run the same command to resume"
    )
    assert error.value.step == 2 and calls == [1, 1]
    assert tf.train.latest_checkpoint(str(tmp_path)) == f"{tmp_path}/ckpt-2"
    assert not (tmp_path / "saved_model").exists() and not (tmp_path / "result.json").exists()
    assert not (tmp_path / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def _command(command, model_dir):
    # Logs every step, checkpoints only when stopped or at the end, exports at the end.
    return command(model_dir, optimizer="momentum", learning_rate=0.1, train_steps=20, checkpoint_steps=1000,
                   keep_checkpoint_max=3, keep_hub_module_max=1)


def _stored_iterations(path):
    paths = checkpoints.checkpoint_variables_by_path(path, root="optimizer")
    (key, _), = [value for name, value in paths.items() if name.endswith("iterations")]
    return int(tf.train.load_checkpoint(path).get_tensor(key))


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_the_same_command_resumes(tmp_path, tiny_run_command):
    model_dir = tmp_path / "run"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(_command(tiny_run_command, model_dir), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 600
            while not re.search(r"step ([3-9]|\d\d)/20", log_path.read_text()):
                assert first.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no step logged"
                time.sleep(0.05)
            signalled_after = max(int(s) for s in re.findall(r"step (\d+)/20", log_path.read_text()))
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    text = log_path.read_text()
    assert first.returncode == preemption.EXIT_CODE == 143, text[-3000:]
    assert "Traceback" not in text
    saved_at = int(re.search(rf"Preempted \(SIGTERM\) at step (\d+): saved {model_dir}/ckpt-\1; "
                             "run the same command to resume", text).group(1))
    assert 3 <= signalled_after <= saved_at < 20  # not the interval's step 0 or 1000
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest == f"{model_dir}/ckpt-{saved_at}" and _stored_iterations(latest) == saved_at
    assert not (model_dir / "saved_model").exists() and not (model_dir / ".lock").exists()

    second = subprocess.run(_command(tiny_run_command, model_dir), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {model_dir}/ckpt-{saved_at}\n" in second.stderr
    assert f"Resuming at step {saved_at}: the training data continues in epoch {saved_at * 16 // 64}" in second.stderr
    latest = tf.train.latest_checkpoint(str(model_dir))
    assert latest == f"{model_dir}/ckpt-20" and _stored_iterations(latest) == 20
    assert (model_dir / "saved_model" / "20").is_dir() and not (model_dir / ".lock").exists()
