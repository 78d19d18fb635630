"""The semi-supervised recipes (flags/cifar10_1pct_<mode>_cpu.cfg) start from the CPU
pretraining recipe: same model and split, 1% labels, and its model_dir as --checkpoint (those
that fine-tune a classifier, semivit, the fine-tuning recipe's model_dir).

A mismatch would only show when someone runs the recipe (a restore error after the
pretraining's 35 minutes), so it is checked here on the parsed flags.
"""

import copy
import dataclasses
import pathlib
import re

from absl import flags
import pytest

from simclr_tf import cli
from simclr_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "flags" / "cifar10_folder_cpu.cfg"
FINETUNE = REPO / "flags" / "cifar10_folder_finetune_1pct.cfg"


def _config(recipe: pathlib.Path) -> config_lib.Config:
    values = flags.FlagValues()
    for flag in flags.FLAGS.get_flags_for_module(cli.__name__):
        values[flag.name] = copy.deepcopy(flag)  # leave the global FLAGS untouched
    values(["run.py", f"--flagfile={recipe}"])
    return cli.config_from_flags(values)


def _model_dir(recipe: pathlib.Path) -> str:
    """The --model_dir of a recipe's header command (the first one it names)."""
    return re.findall(r"--model_dir=(\S+)", recipe.read_text())[0]


@pytest.mark.parametrize("train_mode", config_lib.SEMI_SUPERVISED_MODES)
def test_semi_recipe_starts_from_the_cpu_pretraining_run(train_mode, monkeypatch):
    monkeypatch.chdir(REPO)  # nested --flagfile= lines are read relative to the working directory
    recipe = REPO / "flags" / f"cifar10_1pct_{train_mode}_cpu.cfg"
    assert recipe.exists(), f"no recipe for --train_mode={train_mode}"
    config, pretrain = _config(recipe), _config(PRETRAIN)
    config_lib.validate(config)

    assert config.train.train_mode == train_mode
    start = FINETUNE if train_mode in config_lib.SEMI_SUPERVISED_FROM_CHECKPOINT_MODES else PRETRAIN
    assert config.train.checkpoint == _model_dir(start)
    assert f"--model_dir=runs/cifar10_1pct_{train_mode}_cpu" in recipe.read_text()
    assert config.data.labeled_fraction == 0.01 and config.data.labeled_per_class == 0
    for field in ("dataset", "train_split", "eval_split"):
        assert getattr(config.data, field) == getattr(pretrain.data, field), field
    # The model flags, but for what fine-tuning chooses: the classifier's input and its init,
    # which layers train.
    for field in dataclasses.fields(config_lib.ModelConfig):
        if field.name not in ("ft_proj_selector", "zero_init_logits_layer", "fine_tune_after_block"):
            assert getattr(config.model, field.name) == getattr(pretrain.model, field.name), field.name
    assert config.model.ft_proj_selector == 1  # the SimCLRv2 paper's, as the fine-tuning recipe
