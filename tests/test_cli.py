import copy
import pathlib
import subprocess
import sys

from absl import flags
import pytest

from simclr_tf import cli
from simclr_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every flag of the original tf2/run.py, which we accept with the same name and meaning.
ORIGINAL_FLAGS = """learning_rate learning_rate_scaling warmup_epochs weight_decay batch_norm_decay
train_batch_size train_split train_epochs train_steps eval_steps eval_batch_size checkpoint_epochs
checkpoint_steps eval_split dataset cache_dataset mode train_mode lineareval_while_pretraining
checkpoint zero_init_logits_layer fine_tune_after_block master model_dir data_dir use_tpu tpu_name
tpu_zone gcp_project optimizer momentum eval_name keep_checkpoint_max keep_hub_module_max
temperature hidden_norm proj_head_mode proj_out_dim num_proj_layers ft_proj_selector global_bn
width_multiplier resnet_depth sk_ratio se_ratio image_size color_jitter_strength use_blur""".split()


def _parsed(*args):
    values = flags.FlagValues()
    for flag in flags.FLAGS.get_flags_for_module(cli.__name__):
        values[flag.name] = copy.deepcopy(flag)  # leave the global FLAGS untouched
    values(["run.py", *args])
    return values


def test_all_original_flags_are_defined():
    defined = {f.name for f in flags.FLAGS.get_flags_for_module(cli.__name__)}
    assert set(ORIGINAL_FLAGS) <= defined


def test_every_config_field_has_a_flag():
    defined = {f.name for f in flags.FLAGS.get_flags_for_module(cli.__name__)}
    assert set(config_lib.all_field_names()) <= defined


def test_flags_build_the_typed_config():
    values = _parsed("--resnet_depth=50", "--width_multiplier=2", "--train_steps=9", "--optimizer=momentum",
                     "--dataset=folder:/data", "--use_blur=false")
    config = cli.config_from_flags(values)
    assert config.model.resnet_depth == 50 and config.model.width_multiplier == 2.0
    assert config.train.train_steps == 9 and config.optim.optimizer == "momentum"
    assert config.data.dataset == "folder:/data" and config.data.use_blur is False
    # Flag defaults and dataclass defaults are one source of truth.
    assert cli.config_from_flags(_parsed()) == config_lib.Config()


def test_invalid_combination_is_reported_with_the_flag_name():
    with pytest.raises(ValueError, match="--ft_proj_selector"):
        cli.config_from_flags(_parsed("--proj_head_mode=none", "--ft_proj_selector=1"))


@pytest.mark.parametrize("recipe", sorted((REPO / "flags").glob("*.cfg")), ids=lambda p: p.name)
def test_recipes_parse_and_validate(recipe):
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe starts with a header comment"
    for word in ("Command", "Hardware", "Time", "Result"):
        assert word.lower() in text.lower(), f"{recipe.name} header lacks {word}"
    config = cli.config_from_flags(_parsed(f"--flagfile={recipe}"))
    config_lib.validate(config)


def test_help_lists_simclr_flags():
    # absl exits with status 1 after printing --help.
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--train_mode" in out and "--ft_proj_selector" in out
