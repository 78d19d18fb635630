"""Evaluation restores the heads exactly: a checkpoint without one is refused, never run with a random one."""

import dataclasses

import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.models import build_model
from simclr_tf.train import checkpoints, evaluation, runner
from simclr_tf.train.experiment import Experiment


def _config() -> Config:
    """Evaluating a fine-tuned ResNet-10 x0.25 whose classifier reads projection layer 1."""
    return Config().replace(
        model={"resnet_depth": 10, "width_multiplier": 0.25, "sk_ratio": 0.0, "se_ratio": 0.0,
               "image_size": 16, "num_proj_layers": 2, "proj_out_dim": 16, "ft_proj_selector": 1},
        data={"dataset": "mnist5k", "train_split": "train[:32]", "eval_split": "validation[:16]",
              "use_blur": False, "cache_dataset": True},
        train={"mode": "eval", "train_mode": "finetune", "train_steps": 1, "train_batch_size": 16,
               "eval_batch_size": 16, "keep_hub_module_max": 0, "knn_eval": False},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """ckpt-1 of the whole model, of the model without its classifier, and without projection layers."""
    model_config = _config().model
    variants = {
        "whole": build_model(model_config, num_classes=10, drop_unused_projection_layers=True),
        "no supervised head": build_model(model_config, num_classes=None, drop_unused_projection_layers=True),
        # Selector 0: the classifier reads the backbone, so no projection layer is kept.
        "no projection head": build_model(dataclasses.replace(model_config, ft_proj_selector=0), num_classes=10,
                                          drop_unused_projection_layers=True),
    }
    assert not variants["no projection head"].projection_head.linear_layers
    return {name: tf.train.Checkpoint(model=model).write(str(tmp_path_factory.mktemp("c") / "ckpt-1"))
            for name, model in variants.items()}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return Experiment.create(_config(), str(tmp_path_factory.mktemp("eval")), tf.distribute.get_strategy())


def test_eval_refuses_a_checkpoint_without_a_head_the_model_uses(saved, experiment, monkeypatch):
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate", lambda experiment, model, step: evaluated.append(step) or {})
    model = experiment.build_model()
    # The whole checkpoint passes both ways of evaluating, so the refusals below are about the heads:
    runner.evaluate_checkpoint(experiment, saved["whole"])  # --mode=eval --checkpoint=<prefix>
    runner.restore_model_for_eval(model, saved["whole"])  # --mode=eval following model_dir
    assert evaluated == [1]

    for missing, part in (("no supervised head", "supervised_head"), ("no projection head", "projection_head")):
        for evaluate in (lambda path: runner.evaluate_checkpoint(experiment, path),
                         lambda path: runner.restore_model_for_eval(model, path)):
            with pytest.raises(checkpoints.CheckpointMismatchError,
                               match=f"missing from the checkpoint:\n  model/{part}/"):
                evaluate(saved[missing])
    assert evaluated == [1]
