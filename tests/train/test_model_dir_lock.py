"""One training run per model_dir: a second one stops at once, a dead holder's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from simclr_tf import distribute
from simclr_tf.config import Config, FlagError, RuntimeConfig
from simclr_tf.train import model_dir_lock, runner
from simclr_tf.train.model_dir_lock import ModelDirInUseError


def _write_lock(model_dir, *, host, pid, started="2026-01-01 00:00:00 UTC", token="old"):
    model_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": host, "pid": pid, "started": started, "command": "run.py --model_dir=x", "token": token}
    (model_dir / ".lock").write_text(json.dumps(holder))


def _read_lock(model_dir):
    return json.loads((model_dir / ".lock").read_text())


@pytest.fixture
def live_pid():
    """A process of this host that runs for the whole test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def test_a_live_holder_on_this_host_refuses_with_who_and_what_to_do(tmp_path, live_pid):
    _write_lock(tmp_path, host=socket.gethostname(), pid=live_pid)
    with pytest.raises(ModelDirInUseError) as error:
        with model_dir_lock.hold(str(tmp_path)):
            pass
    message = str(error.value)
    assert isinstance(error.value, FlagError)  # run.py prints it as a one-line usage error
    assert message.startswith(f"--model_dir={tmp_path} is in use by another training run: ")
    assert f"pid {live_pid} on host {socket.gethostname()} since 2026-01-01 00:00:00 UTC" in message
    assert f"delete {tmp_path}/.lock" in message and "another --model_dir" in message
    assert _read_lock(tmp_path)["pid"] == live_pid  # left alone


def test_a_holder_on_another_host_cannot_be_checked_and_refuses(tmp_path):
    _write_lock(tmp_path, host="some-other-host", pid=os.getpid())
    with pytest.raises(ModelDirInUseError, match="cannot check whether a process on some-other-host still runs"):
        with model_dir_lock.hold(str(tmp_path)):
            pass


def test_a_dead_holder_is_taken_over_with_a_warning_and_released(tmp_path, dead_pid, caplog):
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid)
    with caplog.at_level(logging.WARNING):
        with model_dir_lock.hold(str(tmp_path)):
            held = _read_lock(tmp_path)
            assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
            # Re-entrant within the process: run.py holds it and train_and_evaluate takes it again.
            with model_dir_lock.hold(str(tmp_path)):
                pass
            assert (tmp_path / ".lock").exists()
    assert f"Taking over {tmp_path}/.lock" in caplog.text and f"pid {dead_pid}" in caplog.text
    assert not (tmp_path / ".lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


def test_released_on_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with model_dir_lock.hold(str(tmp_path / "run")):
            raise RuntimeError("boom")
    assert not (tmp_path / "run" / ".lock").exists()


def test_eval_runs_alongside_a_training_run(tmp_path, live_pid, monkeypatch):
    _write_lock(tmp_path, host=socket.gethostname(), pid=live_pid)
    monkeypatch.setattr(runner, "_train_and_evaluate", lambda *args: "ran")
    assert runner.train_and_evaluate(Config().replace(train={"mode": "eval"}), str(tmp_path)) == "ran"
    for mode in ("train", "train_then_eval"):
        with pytest.raises(ModelDirInUseError):
            runner.train_and_evaluate(Config().replace(train={"mode": mode}), str(tmp_path))


def _tf_config(task_type, index, chief=False):
    cluster = {"worker": ["a:1", "b:1"]}
    if chief:
        cluster["chief"] = ["c:1"]
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


@pytest.mark.parametrize("runtime,environ,writes", [
    (RuntimeConfig(), {}, True),
    (RuntimeConfig(), _tf_config("worker", 0), True),
    (RuntimeConfig(), _tf_config("worker", 1), False),
    (RuntimeConfig(), _tf_config("worker", 0, chief=True), False),
    (RuntimeConfig(), _tf_config("chief", 0, chief=True), True),
    # Each process of an explicit single-machine strategy is a run of its own.
    (RuntimeConfig(strategy="mirrored"), _tf_config("worker", 1), True),
])
def test_only_the_chief_of_a_multi_worker_run_holds_the_lock(runtime, environ, writes):
    assert distribute.writes_model_dir(runtime, environ) is writes


def _long_run(command, model_dir, **flags):
    # Steps and checkpoints far beyond the test: the run trains until SIGTERM.
    return command(model_dir, train_steps=100000, checkpoint_steps=100000, **flags)


@pytest.mark.slow
def test_a_second_run_stops_at_once_while_the_first_goes_on(tmp_path, tiny_run_command):
    model_dir = tmp_path / "run"
    with open(tmp_path / "first.log", "w+") as log:
        first = subprocess.Popen(_long_run(tiny_run_command, model_dir), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 600
            while "step 1/100000" not in (tmp_path / "first.log").read_text():
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run never logged a step"
                time.sleep(0.1)
            flags_before = (model_dir / "flags.json").read_text()
            second = subprocess.run(_long_run(tiny_run_command, model_dir, learning_rate=0.5), capture_output=True, text=True,
                                    timeout=600, cwd=tmp_path)
            assert first.poll() is None, "the first run must still be training"
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert second.returncode == 1
    assert f"--model_dir={model_dir} is in use by another training run: pid {first.pid} on host " in second.stderr
    assert "Traceback" not in second.stderr
    assert (model_dir / "flags.json").read_text() == flags_before  # the first run's, untouched
    # SIGTERM releases it too.
    assert first.returncode == 143, (tmp_path / "first.log").read_text()[-3000:]
    assert not (model_dir / ".lock").exists()
