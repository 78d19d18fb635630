"""The strategy factory, and a real two-worker MultiWorkerMirroredStrategy run.

The multi-worker test starts two worker processes on 127.0.0.1 (TF_CONFIG picks the
strategy, as on a cluster), trains a tiny model for 2 steps, then runs both again to 3
steps: the second run resumes from the chief's checkpoint. Both workers must end with
identical weights, and only the chief may leave checkpoints and summaries.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf.config import Config, RuntimeConfig, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tf_config(workers: int, chief: bool = False) -> dict:
    cluster = {"worker": [f"127.0.0.1:{2000 + i}" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["127.0.0.1:1999"]
    return {"cluster": cluster, "task": {"type": "worker", "index": 0}}


@pytest.mark.parametrize(
    "runtime,tf_config,num_gpus,expected",
    [
        (RuntimeConfig(), {}, 0, "default"),
        (RuntimeConfig(), {}, 2, "mirrored"),
        (RuntimeConfig(), _tf_config(1), 0, "default"),  # a one-task cluster is one machine
        (RuntimeConfig(), _tf_config(2), 0, "multi_worker"),
        (RuntimeConfig(), _tf_config(1, chief=True), 4, "multi_worker"),
        (RuntimeConfig(strategy="mirrored"), _tf_config(2), 0, "mirrored"),  # explicit wins
        (RuntimeConfig(strategy="default"), {}, 8, "default"),
        (RuntimeConfig(strategy="multi_worker"), {}, 0, "multi_worker"),
        (RuntimeConfig(use_tpu=True), _tf_config(2), 8, "tpu"),
        (RuntimeConfig(strategy="tpu"), {}, 0, "tpu"),
    ],
)
def test_choose_strategy(runtime, tf_config, num_gpus, expected):
    assert distribute.choose_strategy(runtime, tf_config=tf_config, num_gpus=num_gpus) == expected


def test_tf_config_is_read_from_the_environment():
    assert distribute.read_tf_config({}) == {}
    assert distribute.cluster_size(distribute.read_tf_config({"TF_CONFIG": json.dumps(_tf_config(3))})) == 3
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.read_tf_config({"TF_CONFIG": "{not json"})


def test_strategy_flags_are_validated():
    with pytest.raises(ValueError, match="--strategy"):
        validate(Config.demo().replace(runtime={"use_tpu": True, "strategy": "mirrored"}))
    with pytest.raises(ValueError, match="--strategy"):
        validate(Config.demo().replace(runtime={"strategy": "parameter_server"}))
    with pytest.raises(ValueError, match="--precision"):
        validate(Config.demo().replace(runtime={"precision": "float16"}))


def test_default_strategy_is_built_and_is_chief():
    strategy = distribute.build_strategy(RuntimeConfig(strategy="default"), environ={})
    assert strategy is tf.distribute.get_strategy()
    assert distribute.is_chief(strategy)


class _Recorder:
    """Stands in for the TPU APIs; records how it was called."""

    def __init__(self):
        self.calls = []

    def resolver(self, *args, **kwargs):
        self.calls.append(("resolver", args, kwargs))
        return "resolver"

    def connect(self, resolver):
        self.calls.append(("connect", resolver))

    def initialize(self, resolver):
        self.calls.append(("initialize", resolver))
        return type("Topology", (), {"num_tasks": 1, "num_tpus_per_task": 8})()

    def strategy(self, resolver):
        self.calls.append(("strategy", resolver))
        return type("FakeTPUStrategy", (), {"num_replicas_in_sync": 8})()


@pytest.mark.parametrize(
    "runtime,resolver_call",
    [
        (RuntimeConfig(use_tpu=True, tpu_name="my-tpu", tpu_zone="us-central1-b", gcp_project="proj"),
         (("my-tpu",), {"zone": "us-central1-b", "project": "proj"})),
        # Without --tpu_name, --master (e.g. grpc://10.0.0.2:8470, or "" on a TPU VM).
        (RuntimeConfig(use_tpu=True, master="grpc://10.0.0.2:8470"), (("grpc://10.0.0.2:8470",), {})),
        (RuntimeConfig(strategy="tpu"), (("",), {})),
    ],
)
def test_tpu_path_connects_initialises_and_builds_the_strategy(monkeypatch, runtime, resolver_call):
    fake = _Recorder()
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", fake.resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", fake.connect)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", fake.initialize)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", fake.strategy)
    strategy = distribute.build_strategy(runtime, environ={"TF_CONFIG": json.dumps(_tf_config(2))})
    assert type(strategy).__name__ == "FakeTPUStrategy"
    assert fake.calls == [
        ("resolver", *resolver_call),
        ("connect", "resolver"),
        ("initialize", "resolver"),
        ("strategy", "resolver"),
    ]


# --------------------------------------------------------------------------- multi-worker

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    from absl import logging
    from simclr_tf.config import Config
    from simclr_tf.train import hparams, trainer
    from simclr_tf.train.experiment import Experiment

    logging.set_verbosity(logging.INFO)  # the test reads the "Saved ..." lines
    config = Config.from_dict(json.loads(sys.argv[1]))
    experiment = Experiment.create(config, sys.argv[2])  # the strategy comes from TF_CONFIG
    hparams.write_session(config, sys.argv[2], experiment.strategy)  # as the runner
    state = trainer.train(experiment)
    np.savez(sys.argv[3] + ".npz", *[v.numpy() for v in state.model.weights])
    with open(sys.argv[3] + ".json", "w") as f:
        json.dump({
            "multi_worker": isinstance(experiment.strategy, tf.distribute.MultiWorkerMirroredStrategy),
            "replicas": experiment.strategy.num_replicas_in_sync,
            "restored_from": state.restore_report.source,
            "step": int(state.optimizer.iterations.numpy()),
            "pid": os.getpid(),
        }, f)
    """
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _worker_env(cluster: dict, index: int) -> dict:
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
        TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        # The script's own directory comes first on sys.path: import this checkout's
        # simclr_tf, not whichever one is installed.
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )


def _run_workers(script, config: Config, model_dir, out_dir, tag: str, timeout: float = 150) -> list[dict]:
    """Runs the two workers to completion (or kills both); returns their reports."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    for index in range(2):
        env = _worker_env(cluster, index)
        log = open(out_dir / f"{tag}_worker{index}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(script), config.to_json(), str(model_dir), str(out_dir / f"{tag}_{index}")],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {index} failed ({proc.returncode}):\n{texts[index][-4000:]}"
    reports = [json.loads((out_dir / f"{tag}_{i}.json").read_text()) for i in range(2)]
    for report, text in zip(reports, texts):
        report["log"] = text
    return reports


def _weights(path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.slow
def test_two_workers_train_identically_and_only_the_chief_writes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    model_dir = tmp_path / "model"
    config = Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 1,
               "global_bn": True},
        data={"dataset": "mnist5k", "train_split": "train[:64]", "eval_split": "validation[:16]"},
        optim={"warmup_epochs": 0},
        train={"mode": "train", "train_steps": 2, "train_batch_size": 8, "log_every_steps": 1,
               "checkpoint_steps": 1, "lineareval_while_pretraining": True, "keep_hub_module_max": 0},
        runtime={"strategy": "auto"},
    )
    first = _run_workers(script, config, model_dir, tmp_path, "first")
    for report in first:
        assert report["multi_worker"] and report["replicas"] == 2
        assert report["restored_from"] == "scratch" and report["step"] == 2
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-2")

    second = _run_workers(script, config.replace(train={"train_steps": 3}), model_dir, tmp_path, "second")
    for report in second:
        assert report["restored_from"] == "model_dir" and report["step"] == 3
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-3")

    for tag in ("first", "second"):
        chief, other = (_weights(tmp_path / f"{tag}_{i}.npz") for i in range(2))
        assert len(chief) == len(other) > 0
        for a, b in zip(chief, other):
            np.testing.assert_array_equal(a, b)
    # Only the chief (worker 0) logs saves and writes event files; no temporary
    # directory of the other worker is left behind.
    for report in (first[0], second[0]):
        assert "Saved " in report["log"]
    for report in (first[1], second[1]):
        assert "Saved " not in report["log"]
    events = [p.name for p in model_dir.glob("events.out.tfevents.*") if not p.name.endswith(".hparams")]
    assert len(events) == 2  # one per chief run
    # and one HParams session, the second run's (its --train_steps differ)
    (session,) = model_dir.glob("events.out.tfevents.*.hparams")
    assert int(session.name.split(".")[-3]) == second[0]["pid"]
    chief_pids = {first[0]["pid"], second[0]["pid"]}
    assert {int(name.split(".")[-3]) for name in events} == chief_pids
    assert not [p for p in model_dir.iterdir() if p.is_dir()]
    assert sorted(p.name for p in model_dir.glob("ckpt-*.index")) == [f"ckpt-{i}.index" for i in range(1, 4)]


@pytest.mark.slow
def test_sigterm_to_one_worker_makes_all_save_at_one_step_and_only_the_chief_locks(tmp_path):
    # run.py on both workers: the non-chief must not take model_dir's lock (it would
    # stop the chief at once), and a SIGTERM to it alone must stop both at one step.
    model_dir = tmp_path / "model"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    command = [
        sys.executable, str(REPO / "run.py"), f"--model_dir={model_dir}", "--mode=train",
        "--train_mode=pretrain", "--dataset=mnist5k", "--train_split=train[:64]",
        "--eval_split=validation[:16]", "--resnet_depth=10", "--width_multiplier=0.25", "--image_size=16",
        "--num_proj_layers=1", "--proj_out_dim=16", "--train_batch_size=8", "--use_blur=false",
        "--cache_dataset=true", "--warmup_epochs=0", "--train_steps=1000", "--checkpoint_steps=1000",
        "--log_every_steps=1", "--keep_hub_module_max=0", "--strategy=auto",
    ]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    try:
        for index in range(2):
            with open(logs[index], "w") as log:
                procs.append(subprocess.Popen(command, env=_worker_env(cluster, index), cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 600
        while not all("step 2/1000" in log.read_text() for log in logs):
            for proc, log in zip(procs, logs):
                assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    texts = [log.read_text() for log in logs]
    for proc, text in zip(procs, texts):
        assert proc.returncode == 143, text[-3000:]
    chief = re.search(r"Preempted \(SIGTERM on another worker\) at step (\d+): saved (\S+);", texts[0])
    other = re.search(r"Preempted \(SIGTERM\) at step (\d+): the chief saved its checkpoint;", texts[1])
    assert chief and other and chief.group(1) == other.group(1), (texts[0][-2000:], texts[1][-2000:])
    step = int(chief.group(1))
    assert chief.group(2) == f"{model_dir}/ckpt-{step}" == tf.train.latest_checkpoint(str(model_dir))
    assert 2 <= step < 1000
    assert not (model_dir / ".lock").exists()
    assert not [p for p in model_dir.iterdir() if p.is_dir()]  # no worker's temporary copy left
