"""Commands copied from the original SimCLR READMEs resolve to the original's settings.

The commands below are test data: every `python run.py ...` command of the original
google-research/simclr README.md (which runs its TF1 `run.py`) and tf2/README.md (its
TF2 `tf2/run.py`), copied verbatim. Each is parsed by our flags (nothing is run) and the
resolved Config is compared, for every flag it shares with the original, with what the
original ran: the original's defaults (transcribed below from its run.py files)
overridden by the command's flags.
"""

import copy
import logging
import pathlib
import shlex

from absl import flags
import pytest

from simclr_tf import cli
from simclr_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# The defaults of the original tf2/run.py, flag by flag (model_dir left out: not a Config field).
ORIGINAL_TF2_DEFAULTS = {
    "learning_rate": 0.3, "learning_rate_scaling": "linear", "warmup_epochs": 10, "weight_decay": 1e-6,
    "batch_norm_decay": 0.9, "train_batch_size": 512, "train_split": "train", "train_epochs": 100,
    "train_steps": 0, "eval_steps": 0, "eval_batch_size": 256, "checkpoint_epochs": 1, "checkpoint_steps": 0,
    "eval_split": "validation", "dataset": "imagenet2012", "cache_dataset": False, "mode": "train",
    "train_mode": "pretrain", "lineareval_while_pretraining": True, "checkpoint": None,
    "zero_init_logits_layer": False, "fine_tune_after_block": -1, "master": None, "data_dir": None,
    "use_tpu": True, "tpu_name": None, "tpu_zone": None, "gcp_project": None, "optimizer": "lars",
    "momentum": 0.9, "eval_name": None, "keep_checkpoint_max": 5, "keep_hub_module_max": 1,
    "temperature": 0.1, "hidden_norm": True, "proj_head_mode": "nonlinear", "proj_out_dim": 128,
    "num_proj_layers": 3, "ft_proj_selector": 0, "global_bn": True, "width_multiplier": 1,
    "resnet_depth": 50, "sk_ratio": 0.0, "se_ratio": 0.0, "image_size": 224, "color_jitter_strength": 1.0,
    "use_blur": True,
}
# The TF1 run.py (top-level README): no eval_steps or lineareval_while_pretraining, a
# larger weight decay, and two flags of its own (TF1_ONLY, not compared).
ORIGINAL_TF1_DEFAULTS = {
    **{k: v for k, v in ORIGINAL_TF2_DEFAULTS.items() if k not in ("eval_steps", "lineareval_while_pretraining")},
    "weight_decay": 1e-4,
}
TF1_ONLY = {"variable_schema": "?!global_step", "train_summary_steps": 100}
# Our only deliberate default change: the original's True fails on any machine without a
# TPU, and every command of the original READMEs passes --use_tpu.
DEFAULTS_CHANGED = {"use_tpu"}

# (README, section, command), verbatim.
COMMANDS = [
    ("README.md", "Pretraining, CIFAR-10 on a single GPU", r"""
python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=1000 \
  --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --use_blur=False --color_jitter_strength=0.5 \
  --model_dir=/tmp/simclr_test --use_tpu=False
"""),
    ("README.md", "Pretraining, ResNet-50 on ImageNet with Cloud TPUs", r"""
python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""),
    ("README.md", "Finetuning the linear head (linear eval), CIFAR-10 on a single GPU", r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=0.0 \
  --train_epochs=100 --train_batch_size=512 --warmup_epochs=0 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --checkpoint=/tmp/simclr_test --model_dir=/tmp/simclr_test_ft --use_tpu=False
"""),
    ("README.md", "Finetuning the linear head (linear eval), ImageNet with Cloud TPUs", r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=1e-6 \
  --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""),
    ("README.md", "Semi-supervised learning and fine-tuning the whole network, ImageNet 1%", r"""
python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=-1 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head_supervised)' \
  --global_bn=True --optimizer=lars --learning_rate=0.005 \
  --learning_rate_scaling=sqrt --weight_decay=0 \
  --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012_subset/1pct --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0 \
  --num_proj_layers=3 --ft_proj_selector=1
"""),
    ("tf2/README.md", "Pretraining, CIFAR-10 with CPU / 1 or more GPUs", r"""
python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=1000 \
  --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --use_blur=False --color_jitter_strength=0.5 \
  --model_dir=/tmp/simclr_test --use_tpu=False
"""),
    # tf2/run.py itself stops at --train_summary_steps ("Unknown command line flag"); we accept it.
    ("tf2/README.md", "Pretraining, ResNet-50 on ImageNet with Cloud TPUs", r"""
python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0
"""),
]


def _args(command: str) -> list[str]:
    """The flags of a README command, as the shell would pass them."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["python", "run.py"]
    return words[2:]


def _parsed(*args: str) -> flags.FlagValues:
    values = flags.FlagValues()
    for flag in flags.FLAGS.get_flags_for_module(cli.__name__):
        values[flag.name] = copy.deepcopy(flag)  # leave the global FLAGS untouched
    values(["run.py", *args])
    return values


def _original_value(default, text: str):
    """`text` read as the original's flag of this default's type would read it."""
    if isinstance(default, bool):
        return {"true": True, "false": False}[text.lower()]
    if isinstance(default, float):
        return float(text)
    if isinstance(default, int):
        return int(text)
    return text


def _original_effective(readme: str, args: list[str]) -> dict:
    defaults = ORIGINAL_TF1_DEFAULTS if readme == "README.md" else ORIGINAL_TF2_DEFAULTS
    effective = dict(defaults)
    for arg in args:
        name, text = arg[2:].split("=", 1)
        if name in TF1_ONLY or name == "model_dir":
            continue
        assert name in defaults, f"--{name} is not a flag of the original {readme}'s run.py"
        effective[name] = _original_value(defaults[name], text)
    return effective


@pytest.mark.parametrize("readme,section,command", COMMANDS, ids=[f"{r}: {s}" for r, s, _ in COMMANDS])
def test_readme_command_resolves_to_the_originals_values(readme, section, command):
    args = _args(command)
    resolved = cli.config_from_flags(_parsed(*args)).flat()
    expected = _original_effective(readme, args)
    shared = sorted(set(expected) & set(resolved))
    assert len(shared) == len(expected), f"flags of the original missing here: {set(expected) - set(resolved)}"
    differences = {name: (resolved[name], expected[name]) for name in shared if resolved[name] != expected[name]}
    assert not differences, f"{readme} ({section}): ours vs the original's: {differences}"


def test_our_defaults_are_the_tf2_originals():
    ours = config_lib.Config().flat()
    differences = {k for k, v in ORIGINAL_TF2_DEFAULTS.items() if ours[k] != v}
    assert differences == DEFAULTS_CHANGED
    assert ours["use_tpu"] is False


@pytest.mark.parametrize("args", [(), ("--mode=train_then_eval", "--train_mode=pretrain")], ids=["nothing", "readme"])
def test_bare_command_is_the_demo(args):
    values = _parsed(*args)
    assert cli.config_from_flags(values) == config_lib.Config.demo()
    note = cli.demo_note(values)
    assert note.startswith("--dataset not given: running the embedded demo with --")
    for name, value in _demo_fields().items():
        assert (f"--{name}={value}" in note) == (f"--{name}" not in " ".join(args)), name


def _demo_fields() -> dict:
    return {name: value for section in config_lib.DEMO_DEFAULTS.values() for name, value in section.items()}


def test_demo_fills_only_the_flags_not_given(tmp_path):
    values = _parsed("--train_steps=3", "--resnet_depth=34", "--mode=eval")
    config = cli.config_from_flags(values)
    assert config == config_lib.Config.demo().replace(
        train={"train_steps": 3, "mode": "eval"}, model={"resnet_depth": 34}
    )
    assert "--resnet_depth" not in cli.demo_note(values) and "--mode" not in cli.demo_note(values)
    # Given in a flagfile counts as given, --dataset included.
    (tmp_path / "a.cfg").write_text("--resnet_depth=34\n")
    assert cli.config_from_flags(_parsed(f"--flagfile={tmp_path / 'a.cfg'}")) == config_lib.Config.demo().replace(
        model={"resnet_depth": 34}
    )
    (tmp_path / "b.cfg").write_text("--dataset=cifar10\n")
    assert cli.config_from_flags(_parsed(f"--flagfile={tmp_path / 'b.cfg'}")) == config_lib.Config().replace(
        data={"dataset": "cifar10"}
    )


def test_explicit_mnist5k_is_the_demo_and_any_other_dataset_the_original():
    values = _parsed("--dataset=mnist5k", "--temperature=0.5")
    assert cli.config_from_flags(values) == config_lib.Config.demo().replace(train={"temperature": 0.5})
    assert cli.demo_note(values).startswith("--dataset=mnist5k is the embedded demo")
    values = _parsed("--dataset=folder:/data")
    assert cli.config_from_flags(values) == config_lib.Config().replace(data={"dataset": "folder:/data"})
    assert cli.demo_note(values) is None


def test_mnist5k_recipe_spells_out_the_demo():
    recipe = REPO / "flags" / "mnist5k_default.cfg"
    spelled = dict(line[2:].split("=", 1) for line in recipe.read_text().splitlines() if line.startswith("--"))
    for section in config_lib.DEMO_DEFAULTS.values():
        for name, value in section.items():
            assert name in spelled, f"{recipe.name} lacks --{name}"
            assert spelled[name].lower() == str(value).lower() or float(spelled[name]) == value, name
    assert cli.config_from_flags(_parsed(f"--flagfile={recipe}")) == config_lib.Config.demo()


def test_flags_json_records_the_demo_values_the_run_used():
    values = _parsed()
    saved = cli.our_flag_values(cli.config_from_flags(values), values)
    assert {name: saved[name] for name in _demo_fields()} == _demo_fields()


def test_train_summary_steps_maps_to_log_every_steps():
    assert cli.config_from_flags(_parsed("--dataset=cifar10", "--train_summary_steps=50")).train.log_every_steps == 50
    # Given explicitly (also in the demo), and over the demo's value.
    assert cli.config_from_flags(_parsed("--train_summary_steps=7")).train.log_every_steps == 7
    values = _parsed("--dataset=cifar10", "--train_summary_steps=50", "--log_every_steps=9")
    assert cli.config_from_flags(values).train.log_every_steps == 9
    assert cli.tf1_notes(values) == ["--train_summary_steps=50 (TF1 run.py) is not used: --log_every_steps=9 is given."]
    values = _parsed("--dataset=cifar10", "--train_summary_steps=0")
    assert cli.config_from_flags(values).train.log_every_steps == config_lib.Config().train.log_every_steps
    (note,) = cli.tf1_notes(values)
    assert note.startswith("--train_summary_steps=0 (TF1 run.py: no training summaries) cannot be honoured")
    assert note.endswith(f"every --log_every_steps ({config_lib.Config().train.log_every_steps} here).")
    (note,) = cli.tf1_notes(_parsed("--train_summary_steps=0"))  # the demo's
    assert note.endswith(f"every --log_every_steps ({config_lib.Config.demo().train.log_every_steps} here).")


def test_tf1_flags_are_logged_with_what_they_mean_here(tmp_path, caplog):
    from absl import app
    from absl.testing import flagsaver

    schema = "(?!global_step|(?:.*/|^)Momentum|head)"
    # A finetune run without --checkpoint stops after the notes, before anything is built.
    # On absl's own logger too: an earlier test in the process may have raised its level.
    with flagsaver.flagsaver(), caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        flags.FLAGS(["run.py", f"--model_dir={tmp_path}", "--train_mode=finetune", "--train_steps=1",
                     f"--variable_schema={schema}", "--train_summary_steps=0"])
        with pytest.raises(app.UsageError, match="^--checkpoint"):
            cli.main(["run.py"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"--variable_schema='{schema}' (TF1 run.py) is not used") for line in lines)
    assert any(line.startswith("--train_summary_steps=0 (TF1 run.py") for line in lines)
    assert any(line.startswith("--dataset not given: running the embedded demo") for line in lines)


def test_unknown_flags_still_fail():
    with pytest.raises(flags.UnrecognizedFlagError):
        _parsed("--variable_schemas=head")
    with pytest.raises(flags.UnrecognizedFlagError):
        _parsed("--hub_module_export=1")
