"""One-step end-to-end runs of the trainer on tiny models and the embedded data."""

import glob
import json
import os
import pathlib
import shutil
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
    """ResNet-10 x0.25 on 64 training / 64 validation digits, 2 steps of batch 16."""
    config = Config.demo().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "image_size": 32, "num_proj_layers": 2},
        data={"dataset": "mnist5k", "train_split": "train[:64]", "eval_split": "validation[:64]"},
        train={
            "mode": "train_then_eval",
            "train_steps": 2,
            "train_batch_size": 16,
            "eval_batch_size": 32,
            "log_every_steps": 1,
            "checkpoint_steps": 2,
            "keep_hub_module_max": 0,  # no SavedModel export (tests/test_export.py covers it)
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
        "eval/knn_top_1_accuracy",
        "eval/knn_top_5_accuracy",
        "eval/knn_raw_pixels_top_1_accuracy",
        "eval/knn_raw_pixels_top_5_accuracy",
        "eval/knn_bank_size",
        "eval/linear_probe_top_1_accuracy",  # the demo fits a probe at eval
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
        "eval/knn_top_1_accuracy", "eval/knn_raw_pixels_top_1_accuracy",
    }
    assert expected <= summary_tags(tmp_path)


def test_pretrain_on_an_image_folder_with_a_carved_validation_split(tmp_path, cifar10_root):
    config = tiny_config(
        data={"dataset": f"folder:{cifar10_root}", "train_split": "train[:64]", "eval_split": "train[99%:]"},
        train={"knn_eval": False, "eval_steps": 1},
    )
    result = train_and_evaluate(config, str(tmp_path))
    assert result["global_step"] == 2 and 0.0 <= result["eval/label_top_1_accuracy"] <= 1.0


def test_pretrain_without_linear_head_evaluates_with_knn(tmp_path):
    config = tiny_config(train={"lineareval_while_pretraining": False})
    result = train_and_evaluate(config, str(tmp_path))
    assert "eval/label_top_1_accuracy" not in result
    assert 0.0 <= result["eval/knn_top_1_accuracy"] <= result["eval/knn_top_5_accuracy"] <= 1.0


def test_resume_continues_from_the_latest_checkpoint(tmp_path, pretrained_dir):
    # A copy of the shared 2-step run (its own config: tiny_config, --mode=train).
    model_dir = tmp_path / "run"
    shutil.copytree(pretrained_dir, model_dir)
    config = tiny_config(train={"mode": "train"})
    experiment = Experiment.create(config.replace(train={"train_steps": 4}), str(model_dir))
    state = trainer.build_train_state(experiment)
    assert state.restore_report.source == "model_dir"
    assert int(state.optimizer.iterations.numpy()) == 2
    kernel_before = state.model.trainable_variables[0].numpy().copy()
    trainer.train(experiment, state)
    assert int(state.optimizer.iterations.numpy()) == 4
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    assert not np.allclose(kernel_before, state.model.trainable_variables[0].numpy())


def test_eval_mode_evaluates_existing_checkpoints_until_the_final_step(tmp_path, pretrained_dir):
    model_dir = tmp_path / "run"
    shutil.copytree(pretrained_dir, model_dir)  # trained by tiny_config with --mode=train
    assert not (model_dir / "result_2.json").exists()
    result = train_and_evaluate(tiny_config(train={"mode": "eval"}), str(model_dir))
    assert result["global_step"] == 2
    assert (model_dir / "result_2.json").exists()


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A 2-step pretraining run shared by the finetune and distill tests."""
    model_dir = tmp_path_factory.mktemp("pretrain")
    train_and_evaluate(tiny_config(train={"mode": "train"}), str(model_dir))
    return model_dir


def finetune_config(checkpoint, **overrides) -> Config:
    config = tiny_config(
        train={"train_mode": "finetune", "checkpoint": str(checkpoint), "knn_eval": False},
        optim={"optimizer": "momentum", "learning_rate": 0.1, "warmup_epochs": 0},
        data={"labeled_per_class": 2},
    )
    return config.replace(**overrides)


def backbone_state(model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in model.backbone.weights}


def test_finetune_from_a_pretraining_checkpoint(tmp_path, pretrained_dir):
    config = finetune_config(pretrained_dir, model={"ft_proj_selector": 1})
    experiment = Experiment.create(config, str(tmp_path))
    assert experiment.num_train_examples == 20  # 2 labels per class, 10 classes
    state = trainer.build_train_state(experiment)
    report = state.restore_report
    assert report.source == "checkpoint" and not report.match.missing
    # One projection layer kept, the other one left in the checkpoint.
    assert len(state.model.projection_head.linear_layers) == 1
    assert any("linear_layers/1" in p for p in report.match.unused)
    before = backbone_state(state.model)
    trainer.train(experiment, state)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    after = backbone_state(state.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_linear_eval_changes_no_backbone_weight_or_statistic(tmp_path, pretrained_dir):
    config = finetune_config(pretrained_dir, model={"fine_tune_after_block": 4}, train={"mode": "train"})
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    before = backbone_state(state.model)
    head_before = [v.numpy().copy() for v in state.model.supervised_head.weights]
    assert not state.model.backbone.trainable_weights
    trainer.train(experiment, state)
    after = backbone_state(state.model)
    assert any("moving_mean" in k for k in before)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(head_before, state.model.supervised_head.weights))


def test_finetune_without_a_checkpoint_is_refused(tmp_path):
    config = finetune_config(None).replace(train={"checkpoint": None})
    with pytest.raises(ValueError, match="--checkpoint"):
        Experiment.create(config, str(tmp_path))


def test_supervised_baseline_trains_from_scratch_on_few_labels(tmp_path):
    config = tiny_config(
        train={"train_mode": "supervised", "knn_eval": False},
        optim={"optimizer": "momentum", "learning_rate": 0.1},
        data={"labeled_fraction": 0.01},
    )
    result = train_and_evaluate(config, str(tmp_path))
    assert result["global_step"] == 2 and "eval/label_top_1_accuracy" in result
    assert Experiment.create(config, str(tmp_path)).num_train_examples == 10  # >= 1 per class


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, pretrained_dir):
    """A fine-tuned teacher (2 steps) whose config.json describes its architecture."""
    model_dir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(finetune_config(pretrained_dir, train={"mode": "train"}), str(model_dir))
    return model_dir


def distill_config(teacher, **overrides) -> Config:
    config = tiny_config(
        train={"train_mode": "distill", "knn_eval": False},
        distill={"teacher_checkpoint": str(teacher), "distill_temperature": 2.0},
        optim={"optimizer": "momentum", "learning_rate": 0.1},
    )
    return config.replace(**overrides)


def test_distillation_never_changes_the_teacher(tmp_path, teacher_dir):
    experiment = Experiment.create(distill_config(teacher_dir), str(tmp_path))
    state = trainer.build_train_state(experiment)
    teacher = state.method.teacher
    assert not teacher.trainable_weights
    teacher_before = [v.numpy().copy() for v in teacher.weights]
    stored = tf.train.load_checkpoint(str(teacher_dir))
    student_before = [v.numpy().copy() for v in state.model.trainable_weights]
    trainer.train(experiment, state)
    for before, variable in zip(teacher_before, teacher.weights):
        np.testing.assert_array_equal(before, variable.numpy(), err_msg=variable.path)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(student_before, state.model.trainable_weights))
    # The student's checkpoint holds the student only.
    student = tf.train.load_checkpoint(str(tmp_path))
    assert len(student.get_variable_to_shape_map()) < 2 * len(stored.get_variable_to_shape_map())
    assert not any("teacher" in key for key in student.get_variable_to_shape_map())


def test_big_to_small_distillation_with_labels(tmp_path):
    # A wider teacher, trained with labels; its architecture is read from its config.json.
    teacher_dir = tmp_path / "teacher"
    teacher_config = tiny_config(
        model={"width_multiplier": 0.5},
        train={"train_mode": "supervised", "mode": "train"},
        optim={"optimizer": "momentum", "learning_rate": 0.1},
    )
    train_and_evaluate(teacher_config, str(teacher_dir))
    config = distill_config(
        teacher_dir, distill={"distill_label_weight": 0.5}, data={"labeled_per_class": 1}
    )
    experiment = Experiment.create(config, str(tmp_path / "student"))
    state = trainer.build_train_state(experiment)
    assert state.method.teacher.backbone.width_multiplier == 0.5
    assert state.model.backbone.width_multiplier == 0.25
    assert "supervised_acc" in state.method.metric_names(state.model)
    trainer.train(experiment, state)
    assert tf.train.latest_checkpoint(str(tmp_path / "student")).endswith("ckpt-2")


def test_self_distillation_starts_from_the_pretrained_student(tmp_path, teacher_dir, pretrained_dir):
    config = distill_config(teacher_dir, train={"checkpoint": str(pretrained_dir), "mode": "train"})
    state = trainer.build_train_state(Experiment.create(config, str(tmp_path)))
    assert state.restore_report.source == "checkpoint" and not state.restore_report.match.missing


def test_distill_teacher_of_another_architecture_is_rejected(tmp_path, teacher_dir):
    config = distill_config(teacher_dir, distill={"teacher_resnet_depth": 34})
    experiment = Experiment.create(config, str(tmp_path))
    with pytest.raises(Exception, match="missing from the checkpoint"):
        trainer.build_train_state(experiment)


def test_non_finite_loss_stops_without_checkpointing(tmp_path):
    config = tiny_config(train={"mode": "train"}, optim={"learning_rate": 1e30, "optimizer": "momentum"})
    config = config.replace(train={"train_steps": 3, "checkpoint_steps": 1})
    with pytest.raises(trainer.NonFiniteLossError, match="step"):
        train_and_evaluate(config, str(tmp_path))
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest is None or int(latest.rsplit("-", 1)[1]) < 3


@pytest.mark.slow
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
        "--eval_split=validation[:16]", "--num_proj_layers=1", "--resnet_depth=10",
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
