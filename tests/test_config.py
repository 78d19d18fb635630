import dataclasses

import pytest

from simclr_tf import config as config_lib
from simclr_tf.config import Config


def test_round_trip_through_dict():
    config = Config.demo().replace(model={"resnet_depth": 50}, train={"train_steps": 7})
    assert Config.from_dict(config.to_dict()) == config


def test_field_names_are_unique_across_sections():
    names = config_lib.all_field_names()
    assert len(names) == len(set(names))


def test_derived_steps_follow_the_original_formulas():
    config = Config.demo().replace(
        train={"train_batch_size": 512, "train_epochs": 100, "checkpoint_epochs": 2},
        optim={"warmup_epochs": 10},
    )
    assert config_lib.train_steps_for(config, 50000) == 50000 * 100 // 512 + 1
    assert config_lib.warmup_steps_for(config, 50000) == int(round(10 * 50000 // 512))
    assert config_lib.checkpoint_steps_for(config, 50000) == 2 * round(50000 / 512)
    assert config_lib.train_steps_for(config.replace(train={"train_steps": 3}), 50000) == 3
    assert config_lib.eval_steps_for(config, 1001) == 4


@pytest.mark.parametrize(
    "section,fields,flag",
    [
        ("model", {"resnet_depth": 42}, "resnet_depth"),
        ("model", {"width_multiplier": 0.3}, "width_multiplier"),
        ("model", {"ft_proj_selector": 4}, "ft_proj_selector"),
        ("model", {"proj_head_mode": "linear", "ft_proj_selector": 2}, "ft_proj_selector"),
        ("model", {"fine_tune_after_block": 5}, "fine_tune_after_block"),
        ("model", {"fine_tune_after_block": 2}, "fine_tune_after_block"),  # while pretraining
        ("model", {"image_size": 4}, "image_size"),
        ("model", {"dropout_rate": 1.0}, "dropout_rate"),
        ("model", {"stochastic_depth_rate": -0.1}, "stochastic_depth_rate"),
        ("train", {"train_batch_size": 0}, "train_batch_size"),
        ("train", {"train_steps": 0, "train_epochs": 0}, "train_steps"),
        ("train", {"temperature": 0.0}, "temperature"),
        ("optim", {"optimizer": "sgd"}, "optimizer"),
        ("optim", {"learning_rate": float("nan")}, "learning_rate"),
        ("model", {"ft_proj_selector": -2}, "ft_proj_selector"),
        ("model", {"proj_head_mode": "none", "ft_proj_selector": 1}, "ft_proj_selector"),
        ("train", {"train_mode": "finetune", "checkpoint": "x"}, None),  # valid: the control case
        ("train", {"train_mode": "supervised", "checkpoint": "/pretrained"}, "checkpoint"),
        ("train", {"train_mode": "distill"}, "teacher_checkpoint"),
        ("train", {"keep_checkpoint_max": 0}, "keep_checkpoint_max"),
        ("train", {"checkpoint_steps": -1}, "checkpoint_steps"),
        ("data", {"color_jitter_strength": -0.5}, "color_jitter_strength"),
        ("data", {"dataset": ""}, "dataset"),
        ("train", {"knn_bank_size": -1}, "knn_bank_size"),
        ("train", {"knn_k": 0}, "knn_k"),
    ],
)
def test_validate_names_the_flag(section, fields, flag):
    config = Config.demo().replace(**{section: fields})
    if flag is None:
        config_lib.validate(config)
        return
    # FlagError is a ValueError whose message starts with the flag: the CLI prints it as is.
    with pytest.raises(config_lib.FlagError, match=f"^--{flag}"):
        config_lib.validate(config)


def test_defaults_are_valid():
    config_lib.validate(Config())
    config_lib.validate(Config.demo())
    for width in (0.25, 0.5, 1.0, 2.0, 3.0):
        config_lib.validate(Config.demo().replace(model={"width_multiplier": width}))
    assert dataclasses.asdict(Config.demo())["model"]["image_size"] == 16
