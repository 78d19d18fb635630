"""A damaged checkpoint costs one interval, not the run: it is skipped, kept, and named."""

import os
import pathlib
import shutil

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config, ModelConfig
from simclr_tf.models import build_model
from simclr_tf.optim import build_optimizer
from simclr_tf import cli
from simclr_tf.train import checkpoints, runner, train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment, save_config

TINY = ModelConfig(resnet_depth=10, width_multiplier=0.25, sk_ratio=0.0, se_ratio=0.0, image_size=32,
                   num_proj_layers=1, proj_out_dim=16)
DATA = ".data-00000-of-00001"

# What a damage does, and the words of the problem reported for it.
DAMAGES = {
    "truncated data": (DATA, "truncate", "data file is shorter than its index says"),
    "flipped data bytes": (DATA, "flip", "Checksum does not match"),
    "truncated index": (".index", "truncate", "ckpt-3.index is damaged"),
    "flipped index bytes": (".index", "flip", "ckpt-3.index is damaged"),
}


def _damage(prefix: pathlib.Path, kind: str) -> dict[str, bytes]:
    """Damages one file of checkpoint `prefix`; returns the bytes of all its files after."""
    suffix, how, _ = DAMAGES[kind]
    path = pathlib.Path(f"{prefix}{suffix}")
    data = bytearray(path.read_bytes())
    if how == "truncate":  # as a full disk or an unfinished copy leaves it
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    return _files_of(prefix)


def _files_of(prefix: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in prefix.parent.glob(prefix.name + ".*")}


def _step(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model, its optimizer, and a directory with ckpt-1..3 of different weights."""
    model = build_model(TINY, num_classes=10)
    optimizer = build_optimizer("momentum", learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    directory = tmp_path_factory.mktemp("three")
    manager = checkpoints.make_manager(model, optimizer, str(directory), max_to_keep=5)
    kernels = {}
    for step in (1, 2, 3):
        kernel = model.trainable_variables[0]
        kernel.assign(np.full(kernel.shape, step, "float32"))
        optimizer.iterations.assign(step)
        manager.save(checkpoint_number=step)
        kernels[step] = kernel.numpy().copy()
    return model, optimizer, directory, kernels


def _copy(saved, tmp_path) -> pathlib.Path:
    model_dir = tmp_path / "run"
    shutil.copytree(saved[2], model_dir)
    return model_dir


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_its_files(kind, saved, tmp_path, caplog):
    model, optimizer, _, kernels = saved
    model_dir = _copy(saved, tmp_path)
    damaged = _damage(model_dir / "ckpt-3", kind)
    manager = checkpoints.make_manager(model, optimizer, str(model_dir), max_to_keep=3)
    with caplog.at_level("WARNING", logger="absl"):
        report = checkpoints.restore(manager, init_checkpoint=None)

    assert report.source == "model_dir" and report.path == f"{model_dir}/ckpt-2" and report.step == 2
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(), kernels[2])
    # Moved aside unchanged, and the warning names the checkpoint, the problem and where.
    (aside,) = {p.parent for p in (model_dir / checkpoints.DAMAGED_DIR).glob("*/ckpt-3.*")}
    assert _files_of(aside / "ckpt-3") == damaged and not list(model_dir.glob("ckpt-3.*"))
    assert f"Checkpoint {model_dir}/ckpt-3 cannot be read (" in caplog.text
    assert DAMAGES[kind][2] in caplog.text
    assert f"moved its files to {aside}. Resuming from the newest readable one, {model_dir}/ckpt-2" in caplog.text
    # The manager and the state file forget it, so the run goes on as usual: the same step
    # is saved again, and --keep_checkpoint_max=3 deletes the oldest.
    assert manager.checkpoints == [f"{model_dir}/ckpt-1", f"{model_dir}/ckpt-2"]
    assert tf.train.latest_checkpoint(str(model_dir)) == f"{model_dir}/ckpt-2"
    for step in (3, 4):
        optimizer.iterations.assign(step)
        manager.save(checkpoint_number=step)
    state = tf.train.get_checkpoint_state(str(model_dir))
    assert [_step(p) for p in state.all_model_checkpoint_paths] == [2, 3, 4]
    assert checkpoints.checkpoint_problem(f"{model_dir}/ckpt-3") is None
    assert _files_of(aside / "ckpt-3") == damaged


@pytest.mark.parametrize("kind", ["flipped data bytes", "flipped index bytes"])
def test_a_damaged_checkpoint_saved_again_with_the_same_sizes_and_times_reads_intact(kind, saved, tmp_path):
    # A file system with coarse timestamps can give the re-saved files the damaged ones'
    # sizes and mtimes (seen on CI); the check must still read the new files.
    model_dir = _copy(saved, tmp_path)
    prefix = model_dir / "ckpt-3"
    intact = _files_of(prefix)
    times = {name: (model_dir / name).stat().st_mtime_ns for name in intact}
    _damage(prefix, kind)
    for name, mtime in times.items():
        os.utime(model_dir / name, ns=(mtime, mtime))
    assert checkpoints.checkpoint_problem(str(prefix)) is not None
    for name, data in intact.items():
        (model_dir / name).unlink()
        (model_dir / name).write_bytes(data)
        os.utime(model_dir / name, ns=(times[name], times[name]))
    assert checkpoints.checkpoint_problem(str(prefix)) is None


def test_a_model_dir_without_a_readable_checkpoint_is_one_error_and_nothing_moves(saved, tmp_path):
    model, optimizer, _, _ = saved
    model_dir = _copy(saved, tmp_path)
    _damage(model_dir / "ckpt-1", "truncated data")
    _damage(model_dir / "ckpt-2", "flipped data bytes")
    _damage(model_dir / "ckpt-3", "truncated index")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    manager = checkpoints.make_manager(model, optimizer, str(model_dir), max_to_keep=3)
    with pytest.raises(checkpoints.UnreadableCheckpointError) as error:
        checkpoints.restore(manager, init_checkpoint=None)
    lines = str(error.value).splitlines()
    assert lines[0] == f"--model_dir={model_dir}: none of its 3 checkpoint(s) can be read back intact:"
    assert lines[1].startswith(f"  {model_dir}/ckpt-3: ckpt-3.index is damaged")
    assert lines[2].startswith(f"  {model_dir}/ckpt-2: tensor ") and "Checksum does not match" in lines[2]
    assert lines[3].startswith(f"  {model_dir}/ckpt-1: its data file is shorter than its index says")
    assert "Nothing was moved or deleted" in lines[4]
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_another_runs_directory_gives_its_newest_readable_checkpoint_and_is_left_alone(saved, tmp_path, caplog):
    model, optimizer, _, kernels = saved
    pretrained = _copy(saved, tmp_path)
    _damage(pretrained / "ckpt-3", "flipped data bytes")
    before = {p.name: p.read_bytes() for p in pretrained.iterdir()}
    manager = checkpoints.make_manager(model, optimizer, str(tmp_path / "finetune"), max_to_keep=3)
    with caplog.at_level("WARNING", logger="absl"):
        report = checkpoints.restore(manager, init_checkpoint=str(pretrained))
    assert report.source == "checkpoint" and report.path == f"{pretrained}/ckpt-2"
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(), kernels[2])
    assert (f"--checkpoint={pretrained}: skipping checkpoint {pretrained}/ckpt-3, which cannot be read "
            "(tensor ") in caplog.text and "Checksum does not match" in caplog.text
    assert {p.name: p.read_bytes() for p in pretrained.iterdir()} == before  # nothing moved there

    resolve = checkpoints.resolve_checkpoint_path
    assert resolve(str(pretrained), flag="teacher_checkpoint") == f"{pretrained}/ckpt-2"
    # A damaged checkpoint named by its prefix is an error, not a silent substitute.
    with pytest.raises(checkpoints.UnreadableCheckpointError,
                       match=f"^--checkpoint={pretrained}/ckpt-3 cannot be read back intact: tensor .*Checksum"):
        resolve(f"{pretrained}/ckpt-3")
    for step in (1, 2):
        _damage(pretrained / f"ckpt-{step}", "truncated index")
    with pytest.raises(checkpoints.UnreadableCheckpointError,
                       match=f"^--teacher_checkpoint={pretrained}: none of its 3 checkpoint"):
        resolve(str(pretrained), flag="teacher_checkpoint")


def _tiny_run_config(**train) -> Config:
    """Pretraining ResNet-10 x0.25 on 32 digits: 3 steps of 16, a checkpoint after each."""
    return Config().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "sk_ratio": 0.0, "se_ratio": 0.0,
               "image_size": 16, "num_proj_layers": 1, "proj_out_dim": 16},
        data={"dataset": "mnist5k", "train_split": "train[:32]", "eval_split": "validation[:16]",
              "use_blur": False, "cache_dataset": True},
        optim={"optimizer": "momentum", "learning_rate": 0.1, "warmup_epochs": 0.0},
        train={"mode": "train", "train_mode": "pretrain", "lineareval_while_pretraining": True,
               "train_steps": 3, "train_batch_size": 16, "eval_batch_size": 16, "eval_steps": 0,
               "checkpoint_steps": 1, "keep_checkpoint_max": 5, "keep_hub_module_max": 0,
               "log_every_steps": 1, "knn_eval": False, **train},
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The model_dir of a finished 3-step run: its config.json and ckpt-1..3 (not trained: fast)."""
    model_dir = tmp_path_factory.mktemp("finished")
    config = _tiny_run_config()
    save_config(config, str(model_dir))
    state = trainer.build_train_state(Experiment.create(config, str(model_dir)))
    for step in (1, 2, 3):
        state.optimizer.iterations.assign(step)
        state.manager.save(checkpoint_number=step)
    return model_dir


def test_a_rerun_resumes_before_a_damaged_checkpoint_and_moves_it_aside(finished_run, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    damaged = _damage(model_dir / "ckpt-3", "truncated data")
    state = trainer.build_train_state(Experiment.create(_tiny_run_config(), str(model_dir)))
    assert state.restore_report.path == f"{model_dir}/ckpt-2"
    (aside,) = (model_dir / checkpoints.DAMAGED_DIR).iterdir()
    assert _files_of(aside / "ckpt-3") == damaged
    assert state.manager.checkpoints == [f"{model_dir}/ckpt-{step}" for step in (1, 2)]


@pytest.mark.slow
def test_the_same_command_again_finishes_the_run(finished_run, tmp_path, caplog):
    # The case: a finished run whose newest data file was cut short.
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    damaged = _damage(model_dir / "ckpt-3", "truncated data")
    with caplog.at_level("INFO", logger="absl"):
        train_and_evaluate(_tiny_run_config(), str(model_dir))
    assert f"Resuming from {model_dir}/ckpt-2" in caplog.text
    (aside,) = (model_dir / checkpoints.DAMAGED_DIR).iterdir()
    assert f"Checkpoint {model_dir}/ckpt-3 cannot be read" in caplog.text and f"moved its files to {aside}" in caplog.text
    assert "Training complete at step 3" in caplog.text
    assert _files_of(aside / "ckpt-3") == damaged
    assert tf.train.latest_checkpoint(str(model_dir)) == f"{model_dir}/ckpt-3"
    assert checkpoints.checkpoint_problem(f"{model_dir}/ckpt-3") is None


def test_run_py_prints_one_error_when_no_checkpoint_reads(finished_run, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    for step in (1, 2, 3):
        _damage(model_dir / f"ckpt-{step}", "flipped index bytes")
    c = _tiny_run_config()
    flag_values = [
        f"--model_dir={model_dir}", "--mode=train", "--train_mode=pretrain", f"--dataset={c.data.dataset}",
        f"--train_split={c.data.train_split}", f"--eval_split={c.data.eval_split}",
        *(f"--{name}={getattr(c.model, name)}" for name in (
            "resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "image_size", "num_proj_layers",
            "proj_out_dim")),
        f"--train_steps={c.train.train_steps}", f"--train_batch_size={c.train.train_batch_size}",
        "--nouse_blur",
    ]
    with flagsaver.flagsaver():
        flags.FLAGS(["run.py", *flag_values])
        with pytest.raises(SystemExit) as error:
            cli.main(["run.py"])
    message = str(error.value)
    assert message.startswith(f"Error: --model_dir={model_dir}: none of its 3 checkpoint(s) can be read")
    assert all(f"{model_dir}/ckpt-{step}: ckpt-{step}.index is damaged" in message for step in (1, 2, 3))


def test_eval_skips_a_damaged_final_checkpoint_and_moves_nothing(finished_run, tmp_path, caplog):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    _damage(model_dir / "ckpt-3", "flipped data bytes")
    before = {p.name: p.read_bytes() for p in model_dir.glob("ckpt-*")}
    experiment = Experiment.create(_tiny_run_config(mode="eval"), str(model_dir))
    with caplog.at_level("INFO", logger="absl"):
        # The final step's checkpoint is listed, though damaged: evaluate step 2 and stop.
        result = runner.evaluate_continuously(experiment, timeout_secs=1)
    assert result["global_step"] == 2
    assert f"skipping checkpoint {model_dir}/ckpt-3, which cannot be read (tensor " in caplog.text
    assert f"The final step's checkpoint is in (evaluated {model_dir}/ckpt-2); done" in caplog.text
    assert {p.name: p.read_bytes() for p in model_dir.glob("ckpt-*")} == before
    assert not (model_dir / checkpoints.DAMAGED_DIR).exists()

    # --mode=eval --checkpoint=<that dir> from an empty model_dir: the same checkpoint.
    config = _tiny_run_config(mode="eval", checkpoint=str(model_dir))
    assert train_and_evaluate(config, str(tmp_path / "other"))["global_step"] == 2
