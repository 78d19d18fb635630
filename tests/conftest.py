"""Shared test setup: quiet TensorFlow and two logical CPU devices.

Two logical CPUs let any test build `tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])`
to check cross-replica behaviour on a machine without accelerators. This must run
before TensorFlow initialises its devices, hence at import time of this conftest.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

import simclr_tf  # noqa: E402,F401  (its TF_ENABLE_ONEDNN_OPTS default must precede TensorFlow)
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # Devices already initialised by an earlier import.
    pass

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_ROOT = REPO_ROOT.parent / "shared" / "datasets" / "cifar10"
FIXTURES_ROOT = REPO_ROOT.parent / "shared" / "fixtures" / "original_tf2"


@pytest.fixture
def two_cpu_strategy():
    """MirroredStrategy over the two logical CPUs configured above."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices")
    # Each MirroredStrategy over the same devices would reuse collective keys and
    # abort on the first all-reduce; TensorFlow's own test helpers bump the base too.
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def cifar10_root():
    if not (CIFAR10_ROOT / "train").is_dir():
        pytest.skip(f"{CIFAR10_ROOT} not present")
    return CIFAR10_ROOT


# The tiny pretraining run of the tests that start run.py in a subprocess (SIGTERM,
# SIGKILL, model_dir's lock): ResNet-10 x0.25 at 16 px on 64 embedded digits, no export.
TINY_RUN_FLAGS = {
    "mode": "train", "train_mode": "pretrain", "dataset": "mnist5k", "train_split": "train[:64]",
    "eval_split": "validation[:16]", "resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16,
    "num_proj_layers": 1, "proj_out_dim": 16, "train_batch_size": 16, "use_blur": False,
    "cache_dataset": True, "warmup_epochs": 0, "log_every_steps": 1, "keep_hub_module_max": 0,
}


def run_py_command(model_dir, **flags) -> list[str]:
    """`python run.py` of this checkout with TINY_RUN_FLAGS, `flags` added or overriding them."""
    values = {**TINY_RUN_FLAGS, **flags}
    return [
        sys.executable, str(REPO_ROOT / "run.py"), f"--model_dir={model_dir}",
        *(f"--{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in values.items()),
    ]


@pytest.fixture
def tiny_run_command():
    """`run_py_command`, for test modules (imported by path, they cannot import conftest)."""
    return run_py_command


def _tiny_method_config(train_mode: str, **sections):
    """A Config of ResNet-10 x0.25 at 16 px on 32 embedded digits, one step of 8, no k-NN."""
    from simclr_tf.config import Config

    config = Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 16, "num_proj_layers": 2},
        data={"dataset": "mnist5k", "train_split": "train[:32]", "eval_split": "validation[:16]"},
        optim={"optimizer": "momentum", "learning_rate": 0.1, "warmup_epochs": 0},
        train={"train_mode": train_mode, "mode": "train", "train_steps": 1, "train_batch_size": 8,
               "eval_batch_size": 16, "log_every_steps": 1, "keep_hub_module_max": 0,
               "knn_eval": False, "linear_probe_eval": False},
    )
    return config.replace(**sections)


@pytest.fixture(scope="session")
def tiny_method_config():
    """`_tiny_method_config(train_mode, **sections)`: tiny in-process runs of any train mode."""
    return _tiny_method_config


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> str:
    """A one-step `supervised` run of `tiny_method_config`: a classifier to start from or teach with."""
    from simclr_tf.train import train_and_evaluate

    model_dir = str(tmp_path_factory.mktemp("tiny_classifier"))
    train_and_evaluate(_tiny_method_config("supervised"), model_dir)
    return model_dir
