import copy
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
from absl.testing import flagsaver
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
    assert cli.config_from_flags(_parsed()) == config_lib.Config.demo()


def test_invalid_combination_is_reported_with_the_flag_name():
    with pytest.raises(ValueError, match="--ft_proj_selector"):
        cli.config_from_flags(_parsed("--proj_head_mode=none", "--ft_proj_selector=1"))


@pytest.mark.parametrize("recipe", sorted((REPO / "flags").glob("*.cfg")), ids=lambda p: p.name)
def test_recipes_parse_and_validate(recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # a recipe's nested --flagfile= line is relative to the working directory
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe starts with a header comment"
    for word in ("Command", "Hardware", "Time", "Result"):
        assert word.lower() in text.lower(), f"{recipe.name} header lacks {word}"
    config = cli.config_from_flags(_parsed(f"--flagfile={recipe}"))
    config_lib.validate(config)


def test_the_demo_recipe_spells_out_the_bare_run(monkeypatch):
    # flags/mnist5k_default.cfg says it is the bare `python run.py`: a value changed in
    # DEMO_DEFAULTS but not in the file (or the reverse) makes them two runs.
    monkeypatch.chdir(REPO)
    from_file = cli.config_from_flags(_parsed(f"--flagfile={REPO / 'flags' / 'mnist5k_default.cfg'}"))
    assert from_file == config_lib.Config.demo()


def test_help_lists_simclr_flags():
    # absl exits with status 1 after printing --help.
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--train_mode" in out and "--ft_proj_selector" in out


def _usage_error(*args):
    """The message `run.py` prints for these flags (cli.main in-process, global FLAGS restored)."""
    with flagsaver.flagsaver():
        flags.FLAGS(["run.py", *args])
        with pytest.raises(app.UsageError) as error:
            cli.main(["run.py"])
    return str(error.value)


def _fake_run(model_dir, **sections):
    """A model_dir with a checkpoint and the config.json of a run with these settings."""
    import tensorflow as tf

    from simclr_tf.train.experiment import save_config

    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(model_dir / "ckpt"))
    save_config(config_lib.Config.demo().replace(**sections), str(model_dir))


TINY_FLAGS = ("--train_split=train[:16]", "--eval_split=validation[:16]", "--train_steps=1")


def test_flags_checked_against_files_fail_before_anything_is_built(tmp_path):
    run = tmp_path / "run"
    message = _usage_error(f"--model_dir={run}", "--train_mode=finetune", *TINY_FLAGS)
    assert message.startswith("--checkpoint: --train_mode=finetune needs --checkpoint")
    message = _usage_error(f"--model_dir={run}", "--train_mode=finetune", f"--checkpoint={tmp_path}/nope")
    assert message.startswith(f"--checkpoint={tmp_path}/nope: no such checkpoint")
    message = _usage_error(f"--model_dir={run}", "--train_mode=distill", f"--teacher_checkpoint={tmp_path}")
    assert message.startswith(f"--teacher_checkpoint={tmp_path} is a directory without a checkpoint")
    message = _usage_error(f"--model_dir={run}", "--dataset=no_such_dataset_xyz", *TINY_FLAGS)
    assert message.startswith("--dataset: Unknown dataset 'no_such_dataset_xyz'") and "folder:" in message
    message = _usage_error(f"--model_dir={run}", "--train_split=trian", "--train_steps=1")
    assert message.startswith("--train_split: ") and "'trian'" in message
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    message = _usage_error(f"--model_dir={blocked}/run", *TINY_FLAGS)
    assert message.startswith(f"--model_dir={blocked}/run: cannot write there")
    assert "Pass a writable directory" in message
    message = _usage_error(f"--model_dir={run}", "--image_size=4")
    assert message.startswith("--image_size: 4 is too small")
    message = _usage_error(f"--model_dir={run}", "--fine_tune_after_block=7", "--train_mode=finetune")
    assert message.startswith("--fine_tune_after_block: 7 must be in -1..4")


def test_a_model_dir_of_another_run_is_refused_and_left_untouched(tmp_path):
    _fake_run(tmp_path, model={"resnet_depth": 50}, train={"train_mode": "pretrain"})
    before = sorted(p.name for p in tmp_path.iterdir())
    message = _usage_error(f"--model_dir={tmp_path}", "--train_mode=supervised", "--image_size=64", *TINY_FLAGS)
    assert message.startswith(f"--model_dir={tmp_path} holds checkpoints of another run")
    for difference in ("--train_mode=pretrain there, supervised here", "--resnet_depth=50 there, 18 here",
                       f"--image_size={config_lib.Config.demo().model.image_size} there, 64 here"):
        assert difference in message
    assert "Use a new --model_dir, or that run's flags to resume it." in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no flags.json, config.json unchanged


def test_batch_not_divisible_by_the_replicas(tmp_path, two_cpu_strategy):
    from simclr_tf.train.experiment import Experiment

    config = config_lib.Config.demo().replace(train={"train_batch_size": 15, "train_steps": 1})
    with pytest.raises(config_lib.FlagError, match=r"^--train_batch_size=15 is not divisible by the 2 replicas"):
        Experiment.create(config, str(tmp_path), two_cpu_strategy)


def test_run_py_prints_a_model_dir_error_without_a_traceback(tmp_path):
    _fake_run(tmp_path, model={"width_multiplier": 2.0})
    command = [sys.executable, str(REPO / "run.py"), f"--model_dir={tmp_path}", *TINY_FLAGS]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert "--width_multiplier=2.0 there, 0.25 here" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_py_names_an_unreadable_image_in_one_line(tmp_path):
    from PIL import Image

    for split, count in (("train", 4), ("validation", 2)):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / split / cls / f"{i}.png")
    broken = tmp_path / "data" / "train" / "b" / "broken.jpg"
    broken.write_bytes(b"<html>404</html>")
    command = [sys.executable, str(REPO / "run.py"), f"--model_dir={tmp_path}/run", f"--dataset=folder:{tmp_path}/data",
               "--train_steps=2", "--train_batch_size=4", "--image_size=8", "--resnet_depth=10", "--width_multiplier=0.25"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line == (f"Error: Cannot decode image file {broken} (not a JPEG/PNG/GIF/BMP, or truncated or "
                         "corrupt): remove or replace it, or pass --skip_bad_images to skip such files.")
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("dataset,kept_out", [("mnist5k", True), ("folder:/data", True), ("cifar10", False)])
def test_runs_keep_keras_optional_imports_out_and_still_train(dataset, kept_out):
    # In a fresh interpreter, as run.py does before TensorFlow is imported.
    script = (
        "import sys\n"
        "from simclr_tf import cli\n"
        f"cli.skip_optional_imports_keras_would_load({dataset!r})\n"
        "import keras, tensorflow as tf\n"
        "from simclr_tf.data import get_source\n"
        "from simclr_tf.models import build_model\n"
        "from simclr_tf.config import ModelConfig\n"
        "assert get_source('mnist5k').num_examples('train') == 4000\n"
        "model = build_model(ModelConfig(resnet_depth=10, width_multiplier=0.25, image_size=16), num_classes=10)\n"
        "model(tf.zeros([2, 16, 16, 3]), training=True)\n"
        "print(sorted(m for m in cli.OPTIONAL_IMPORTS_UNUSED_BY_RUNS if m in sys.modules and sys.modules[m] is None))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    blocked = sorted(cli.OPTIONAL_IMPORTS_UNUSED_BY_RUNS) if kept_out else []
    assert completed.stdout.strip().splitlines()[-1] == str(blocked)
