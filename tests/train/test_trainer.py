"""One-step end-to-end runs of the trainer on tiny models and the embedded data."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.train import train_and_evaluate
from simclr_tf.train import trainer
from simclr_tf.train.experiment import Experiment

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides) -> Config:
    """ResNet-18 x0.25 on 64 training / 64 validation digits, 2 steps of batch 16."""
    config = Config().replace(
        model={"resnet_depth": 18, "width_multiplier": 0.25, "image_size": 32, "num_proj_layers": 2},
        data={"dataset": "mnist5k", "train_split": "train[:64]", "eval_split": "validation[:64]"},
        train={
            "mode": "train_then_eval",
            "train_steps": 2,
            "train_batch_size": 16,
            "eval_batch_size": 32,
            "log_every_steps": 1,
            "checkpoint_steps": 2,
        },
    )
    return config.replace(**overrides)


def summary_tags(model_dir) -> set[str]:
    tags = set()
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_pretrain_with_linear_eval_end_to_end(tmp_path):
    result = train_and_evaluate(tiny_config(), str(tmp_path))

    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk == json.loads((tmp_path / "result_2.json").read_text()) == result
    assert set(on_disk) == {
        "eval/label_top_1_accuracy",
        "eval/label_top_5_accuracy",
        "eval/regularization_loss",
        "global_step",
    }
    assert on_disk["global_step"] == 2
    assert 0.0 <= on_disk["eval/label_top_1_accuracy"] <= on_disk["eval/label_top_5_accuracy"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text()) == tiny_config().to_dict()
    expected = {
        "train/total_loss", "train/contrast_loss", "train/contrast_acc", "train/contrast_entropy",
        "train/supervised_loss", "train/supervised_acc", "train/weight_decay", "learning_rate",
        "train/augmented_views", "eval/label_top_1_accuracy", "eval/regularization_loss",
    }
    assert expected <= summary_tags(tmp_path)


def test_pretrain_without_linear_head_evaluates_with_knn(tmp_path):
    config = tiny_config(train={"lineareval_while_pretraining": False})
    result = train_and_evaluate(config, str(tmp_path))
    assert "eval/label_top_1_accuracy" not in result
    assert 0.0 <= result["eval/knn_top_1_accuracy"] <= result["eval/knn_top_5_accuracy"] <= 1.0


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    config = tiny_config(train={"mode": "train", "checkpoint_steps": 1})
    train_and_evaluate(config, str(tmp_path))
    experiment = Experiment.create(config.replace(train={"train_steps": 4}), str(tmp_path))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "model_dir"
    assert int(state.optimizer.iterations.numpy()) == 2
    kernel_before = state.model.trainable_variables[0].numpy().copy()
    trainer.train(experiment, state)
    assert int(state.optimizer.iterations.numpy()) == 4
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    assert not np.allclose(kernel_before, state.model.trainable_variables[0].numpy())


def test_eval_mode_evaluates_existing_checkpoints_until_the_final_step(tmp_path):
    train_and_evaluate(tiny_config(train={"mode": "train"}), str(tmp_path))
    result = train_and_evaluate(tiny_config(train={"mode": "eval"}), str(tmp_path))
    assert result["global_step"] == 2
    assert (tmp_path / "result_2.json").exists()


def test_finetune_from_a_pretraining_checkpoint(tmp_path):
    pretrain_dir, finetune_dir = tmp_path / "pretrain", tmp_path / "finetune"
    train_and_evaluate(tiny_config(train={"mode": "train"}), str(pretrain_dir))
    config = tiny_config(
        train={"train_mode": "finetune", "checkpoint": str(pretrain_dir)},
        optim={"optimizer": "momentum", "learning_rate": 0.1},
    )
    experiment = Experiment.create(config, str(finetune_dir))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "checkpoint"
    pretrained = tf.train.load_checkpoint(str(pretrain_dir))
    first_kernel = state.model.backbone.trainable_variables[0]
    matches = [
        name for name in pretrained.get_variable_to_shape_map()
        if pretrained.get_variable_to_shape_map()[name] == list(first_kernel.shape)
        and np.allclose(pretrained.get_tensor(name), first_kernel.numpy())
    ]
    assert matches, "the backbone was not initialised from the pretraining checkpoint"
    trainer.train(experiment, state)
    assert tf.train.latest_checkpoint(str(finetune_dir)).endswith("ckpt-2")


def test_non_finite_loss_stops_without_checkpointing(tmp_path):
    config = tiny_config(train={"mode": "train"}, optim={"learning_rate": 1e30, "optimizer": "momentum"})
    config = config.replace(train={"train_steps": 3, "checkpoint_steps": 1})
    with pytest.raises(trainer.NonFiniteLossError, match="step"):
        train_and_evaluate(config, str(tmp_path))
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest is None or int(latest.rsplit("-", 1)[1]) < 3


def test_pretrain_step_under_two_replicas(tmp_path, two_cpu_strategy):
    config = tiny_config(train={"mode": "train"}, model={"global_bn": True})
    train_and_evaluate(config, str(tmp_path), strategy=two_cpu_strategy)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_steps_until_next_event():
    assert trainer.steps_until_next_event(0, 10, 4, 5) == 4
    assert trainer.steps_until_next_event(4, 10, 4, 5) == 1
    assert trainer.steps_until_next_event(5, 10, 4, 5) == 3
    assert trainer.steps_until_next_event(9, 10, 100, 100) == 1
    assert trainer.steps_until_next_event(3, 100, 1, 1) == 1


def test_cli_writes_flags_json(tmp_path):
    model_dir = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "run.py"), f"--model_dir={model_dir}", "--mode=train",
        "--train_steps=1", "--train_batch_size=8", "--train_split=train[:16]",
        "--eval_split=validation[:16]", "--num_proj_layers=1",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = json.loads((model_dir / "flags.json").read_text())
    assert saved["train_steps"] == 1 and saved["model_dir"] == str(model_dir)
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-1")


def test_cli_reports_a_bad_flag_without_a_traceback(tmp_path):
    command = [sys.executable, str(REPO / "run.py"), f"--model_dir={tmp_path}", "--ft_proj_selector=9"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "--ft_proj_selector" in completed.stderr
