"""Converter of original google-research/simclr TF2 checkpoints (simclr_tf/convert.py and
tools/convert_checkpoint.py): outputs of a real original model, every variable of the
released r50_1x_sk1 architecture, clear errors, and use of the result by every train mode.

Fixtures made by the original code (see /work/shared/fixtures/original_tf2/README.md) are
used when present; the rest runs on tiny checkpoints written in the original's layout.
"""

import dataclasses
import importlib.util
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import convert
from simclr_tf.config import Config
from simclr_tf.models import SimCLRModel, build_model, parameter_counts
from simclr_tf.models.simclr_model import _shape_only_variables
from simclr_tf.train import checkpoints, train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "original_tf2"
TINY = dict(resnet_depth=18, width_multiplier=0.25, cifar_stem=True, proj_out_dim=16)


def _fixture(name: str) -> pathlib.Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def _listed_variables(name: str) -> list[convert.OriginalVariable]:
    """The fixture's training-checkpoint listing (key, shape, original name) as variables."""
    variables = []
    for line in (_fixture(name) / "checkpoint_variables_named.txt").read_text().splitlines():
        key, shape, full_name = line.split("\t")
        if key.startswith(f"{convert.ORIGINAL_ROOT}/"):
            path = key.split("/", 1)[1].replace("/.ATTRIBUTES/VARIABLE_VALUE", "")
            variables.append(convert.OriginalVariable(path, tuple(int(d) for d in re.findall(r"\d+", shape)), key, full_name))
    return variables


def _fixture_config(name: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", (_fixture(name) / "config.txt").read_text()))


def _tiny_original(prefix, num_classes=10, global_step=0, **kwargs) -> SimCLRModel:
    """A tiny model (freshly initialised), written as an original training checkpoint."""
    model = SimCLRModel(num_classes, **{**TINY, **kwargs})
    model.build((None, 32, 32, 3))
    convert.save_in_original_layout(model, str(prefix), global_step=global_step)
    return model


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# Against the original's own models
# ---------------------------------------------------------------------------


def test_converted_released_format_matches_every_reference_output(tmp_path):
    # A SavedModel's variables (positional keys) -> our checkpoint -> the restore
    # --checkpoint and eval use -> the original's outputs at every named layer.
    fixture = _fixture("r18_1x_sk0_64px")
    # Pretrained with linear eval, whose classifier reads the backbone (hidden 0); the copy
    # has no saved_model.pb to tell, and its hiddens 0..2 are all 512 wide.
    converted = convert.convert_checkpoint(
        str(fixture / "saved_model"), str(tmp_path), image_size=64, ft_proj_selector=0
    )
    assert converted.checkpoint == str(tmp_path / "ckpt-0")
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    original = _fixture_config("r18_1x_sk0_64px")
    for field in ("resnet_depth", "width_multiplier", "sk_ratio", "image_size", "num_proj_layers", "proj_out_dim"):
        assert saved[field] == float(original[field]), field
    assert saved["proj_head_mode"] == original["proj_head_mode"] and saved["ft_proj_selector"] == 0

    model = build_model(Config.from_dict({"model": saved}).model, num_classes=10, global_bn=False)
    checkpoints.restore_model_weights(model, converted.checkpoint, exact=True)
    reference = np.load(fixture / "reference_outputs.npz")
    outputs = model(reference["input"], training=False)
    # All stages and both heads, also as the original model gives them when called directly.
    compared = {key: key.removeprefix("direct_") for key in reference.files if key != "input"}
    assert len(compared) == 12 and set(compared.values()) <= set(outputs)
    for key, ours in compared.items():
        error = np.max(np.abs(outputs[ours] - reference[key])) / np.max(np.abs(reference[key]))
        assert error < 1e-4, (key, error)
    mapping = json.loads((tmp_path / "conversion.json").read_text())["variables"]
    assert len(mapping) == len(model.weights) == 121
    assert mapping["model/backbone/stem/stem_layers/0/conv2d/_kernel"]["original"] == "resnet/conv2d_fixed_padding/conv2d/kernel"


@pytest.mark.parametrize(
    "fixture,kwargs,size",
    [
        ("r18_1x_sk0_64px", dict(resnet_depth=18, width_multiplier=1), 64),
        ("r50_1x_sk1_224px", dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625), 224),
    ],
)
def test_architecture_and_layout_match_the_original(fixture, kwargs, size):
    original = _listed_variables(fixture)
    architecture = convert.infer_architecture(original, ft_proj_selector=0)
    assert architecture == convert.Architecture(
        **{"sk_ratio": 0.0, **kwargs}, se_ratio=0.0, cifar_stem=False, proj_head_mode="nonlinear",
        num_proj_layers=3, proj_out_dim=128, ft_proj_selector=0, num_classes=10,
    )  # fmt: skip
    counts = parameter_counts(size, trainable_only=True, num_classes=10, **kwargs)
    assert counts["total"] == int(_fixture_config(fixture)["trainable_params"])
    with _shape_only_variables():  # no 44M-parameter allocation
        model = SimCLRModel(10, **kwargs)
        model.build((None, size, size, 3))
        pairs = convert.place_variables(model, original)
        # The inverse, written independently from the original's layer lists, gives the
        # same paths: so each pair is the same layer's variable, not just the same shape.
        layout = {id(weight): path for path, weight in convert.original_layout(model)}
    assert len(pairs) == len(original) == len(model.weights)
    assert sorted(layout.values()) == sorted(v.path for v in original)
    assert all(layout[id(weight)] == o.path for o, weight in pairs)


def _write_listed_checkpoint(variables, prefix) -> dict[str, np.ndarray]:
    """A training checkpoint holding `variables` at their paths, with random values."""
    rng = np.random.default_rng(0)
    values = {v.path: rng.standard_normal(v.shape, dtype=np.float32) for v in variables}
    convert.write_original_checkpoint(values, str(prefix), names={v.path: v.name for v in variables})
    return values


def test_places_every_variable_of_the_released_r50_1x_sk1(tmp_path):
    listed = _listed_variables("r50_1x_sk1_224px")
    values = _write_listed_checkpoint(listed, tmp_path / "ckpt-7")
    conversion = convert.load_original(str(tmp_path / "ckpt-7"), ft_proj_selector=0)
    model = conversion.model
    assert conversion.architecture.sk_ratio == 0.0625 and conversion.architecture.resnet_depth == 50
    assert len(conversion.pairs) == len(listed) == len(model.weights) == 387
    for path, weight in convert.original_layout(model):
        np.testing.assert_array_equal(weight.numpy(), values[path], err_msg=path)
    # A few by hand: ResNet-D shortcut, SK mixing conv, the stem's third conv, the head.
    ours = {v.path: v for v in model.weights}
    for our_path, original_path in {
        "simclr_model/resnet/block_group2/block1/shortcut_conv/conv2d/kernel":
            "resnet_model/block_groups/1/layers/0/projection_layers/2/conv2d/kernel",
        "simclr_model/resnet/block_group1/block1/sk_conv/mixing_conv0/kernel":
            "resnet_model/block_groups/0/layers/0/conv_relu_dropblock_layers/3/conv2d_0/kernel",
        "simclr_model/resnet/stem/conv3/conv2d/kernel": "resnet_model/initial_conv_relu_max_pool/4/conv2d/kernel",
        "simclr_model/head_supervised/linear_layer/dense/bias": "supervised_head/linear_layer/dense/bias",
    }.items():  # fmt: skip
        np.testing.assert_array_equal(ours[our_path].numpy(), values[original_path], err_msg=our_path)


@pytest.mark.parametrize(
    "kwargs,given",
    [
        (dict(resnet_depth=50, sk_ratio=0.0625, se_ratio=0.25, cifar_stem=False), 2),
        (dict(resnet_depth=34, width_multiplier=0.5, se_ratio=0.5, proj_head_mode="linear"), None),
        (dict(resnet_depth=50, num_proj_layers=2, ft_proj_selector=-1), None),  # by shape: 16 wide
        (dict(proj_head_mode="none"), None),
    ],
)
def test_inverse_round_trip_of_other_architectures(kwargs, given):
    with _shape_only_variables():
        model = SimCLRModel(7, **{**TINY, **kwargs})
        model.build((None, 64, 64, 3))
        variables = [convert.OriginalVariable(p, tuple(w.shape), name=p) for p, w in convert.original_layout(model)]
        if kwargs.get("proj_head_mode") == "linear":  # the original names that layer `l_0`
            variables = [dataclasses.replace(v, name=f"projection_head/l_0/{v.kind}") if "_projection_head" in v.path
                         else v for v in variables]
        architecture = convert.infer_architecture(variables, ft_proj_selector=given)
        config = architecture.model_config(None if architecture.cifar_stem else 64)
        rebuilt = build_model(config, num_classes=architecture.num_classes, global_bn=False)
        pairs = convert.place_variables(rebuilt, variables)
    assert [w.path for _, w in pairs] == [w.path for w in model.weights]
    assert architecture.ft_proj_selector % 3 == (given or kwargs.get("ft_proj_selector", 0)) % 3
    for key in ("resnet_depth", "sk_ratio", "se_ratio", "proj_head_mode"):
        if key in kwargs:
            assert getattr(architecture, key) == kwargs[key], key


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _tiny_variables(**kwargs):
    with _shape_only_variables():
        model = SimCLRModel(10, **{**TINY, **kwargs})
        model.build((None, 32, 32, 3))
        return [convert.OriginalVariable(p, tuple(w.shape), name=f"orig/{p}") for p, w in convert.original_layout(model)]


def _place_into_tiny(variables):
    with _shape_only_variables():
        model = SimCLRModel(10, **TINY)
        model.build((None, 32, 32, 3))
        return convert.place_variables(model, variables)


def test_unplaceable_variables_are_named_with_their_shapes():
    variables = _tiny_variables()
    extra = convert.OriginalVariable("resnet_model/extra_head/dense/kernel", (16, 3), name="resnet/extra/kernel")
    with pytest.raises(convert.ConversionError, match=re.escape("resnet/extra/kernel [16, 3]: not in the stem")):
        _place_into_tiny(variables + [extra])
    # A kernel of the wrong shape, in block 2 of block_group3.
    bad = [
        convert.OriginalVariable(v.path, (3, 3, 64, 65), name=v.name)
        if v.path == "resnet_model/block_groups/2/layers/1/conv2d_bn_layers/2/conv2d/kernel" else v
        for v in variables
    ]
    with pytest.raises(convert.ConversionError) as error:
        _place_into_tiny(bad)
    message = str(error.value)
    assert "conv2d_bn_layers/2/conv2d/kernel [3, 3, 64, 65]" in message
    assert "block 2 of block_group3" in message and "block_group1" not in message
    # A missing variable: our weight without a value is named too.
    missing = [v for v in variables if v.path != "supervised_head/linear_layer/dense/bias"]
    with pytest.raises(convert.ConversionError, match=r"\(ours\) simclr_model/head_supervised/linear_layer/dense/bias \[10\]"):
        _place_into_tiny(missing)


def test_variables_outside_the_layers_and_wrong_depths_are_refused(tmp_path):
    root = tf.__internal__.tracking.AutoTrackable()  # tf.Module reserves `variables`
    root.variables = [tf.Variable(tf.zeros([2, 5]), name="stray/kernel")]  # an alias, not a layer
    prefix = tf.train.Checkpoint(model=root).write(str(tmp_path / "stray"))
    with pytest.raises(convert.ConversionError, match=re.escape("stray/kernel [2, 5]")):
        convert.read_original_variables(prefix)
    prefix = tf.train.Checkpoint(other=tf.Module()).write(str(tmp_path / "other"))
    with pytest.raises(convert.ConversionError, match="not a checkpoint or SavedModel of the original"):
        convert.read_original_variables(prefix)
    no_block = [v for v in _tiny_variables() if "block_groups/3/layers/1/" not in v.path]
    with pytest.raises(convert.ConversionError, match=r"per group \(2, 2, 2, 1\) match no ResNet depth"):
        convert.infer_architecture(no_block)


def test_cli_reports_what_it_cannot_place(tool, tmp_path, capsys):
    odd = convert.OriginalVariable("resnet_model/odd_layer/gamma", (3,), name="resnet/odd_layer/gamma")
    _write_listed_checkpoint(_tiny_variables() + [odd], tmp_path / "ckpt-1")
    assert tool.main([f"--source={tmp_path}", f"--output_dir={tmp_path / 'out'}"]) == 1
    assert "resnet/odd_layer/gamma [3]: not in the stem" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# The converted checkpoint in every train mode
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, tool):
    """A tiny original training checkpoint at step 5, converted by the command-line tool."""
    tmp = tmp_path_factory.mktemp("converted")
    model = _tiny_original(tmp / "original" / "ckpt-5", global_step=5)
    args = [f"--source={tmp / 'original'}", f"--output_dir={tmp / 'ours'}", "--export_saved_model"]
    assert tool.main(args + ["--ft_proj_selector=0"]) == 0  # its hiddens 0..2 are all 128 wide
    return tmp / "ours", model


def _run_config(train_mode, checkpoint=None, **train) -> Config:
    return Config.demo().replace(
        model={"resnet_depth": 18, "width_multiplier": 0.25, "image_size": 32, "proj_out_dim": 16},
        data={"dataset": "mnist5k", "train_split": "train[:32]", "eval_split": "validation[:32]"},
        optim={"optimizer": "momentum", "learning_rate": 0.01, "warmup_epochs": 0},
        train={"train_mode": train_mode, "checkpoint": checkpoint and str(checkpoint), "train_steps": 1,
               "train_batch_size": 16, "eval_batch_size": 32, "knn_eval": False, "keep_hub_module_max": 0, **train},
    )  # fmt: skip


def test_finetune_from_a_converted_checkpoint(tmp_path, converted_dir):
    ours, original = converted_dir
    assert tf.train.latest_checkpoint(str(ours)).endswith("ckpt-5")
    exported = tf.saved_model.load(str(ours / "saved_model" / "5"))  # --export_saved_model
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(exported(x, trainable=False)["logits_sup"], original(x)["logits_sup"], rtol=1e-5, atol=1e-6)
    config = _run_config("finetune", ours, mode="train_then_eval")
    experiment = Experiment.create(config, str(tmp_path))
    state = trainer.build_train_state(experiment)
    report = state.restore_report
    assert report.source == "checkpoint" and not report.match.missing  # backbone and head restored
    np.testing.assert_array_equal(
        state.model.backbone.stem.weights[0].numpy(), original.backbone.stem.weights[0].numpy()
    )
    result = train_and_evaluate(config, str(tmp_path))
    assert result["global_step"] == 1 and 0 <= result["eval/label_top_1_accuracy"] <= 1


def test_eval_and_distill_accept_a_converted_checkpoint(tmp_path, converted_dir):
    ours, original = converted_dir
    # --mode=eval with --checkpoint and an empty model_dir evaluates the checkpoint once.
    result = train_and_evaluate(_run_config("finetune", ours, mode="eval"), str(tmp_path / "eval"))
    assert result["global_step"] == 5
    # The teacher's architecture comes from the converted config.json; it holds projection
    # layers the teacher does not use (ft_proj_selector=0), which is fine.
    config = _run_config("distill", mode="train").replace(distill={"teacher_checkpoint": str(ours)})
    state = trainer.build_train_state(Experiment.create(config, str(tmp_path / "distill")))
    teacher = state.method.teacher
    for ours_weight, original_weight in zip(teacher.backbone.weights, original.backbone.weights):
        np.testing.assert_array_equal(ours_weight.numpy(), original_weight.numpy())


# ---------------------------------------------------------------------------
# Which hidden the classifier reads (ft_proj_selector)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("selector,linear_eval", [(0, False), (1, False), (2, False), (3, False), (0, True), (2, True)])
def test_reads_the_classifier_input_from_the_saved_model_graph(tmp_path, selector, linear_eval):
    # write_original_graph mirrors the op names along the classifier's input in the
    # original's export (fine-tuned, and pretrained with linear eval behind a StopGradient).
    path = convert.write_original_graph(
        str(tmp_path), features=512, num_proj_layers=3, proj_out_dim=128, num_classes=10,
        ft_proj_selector=selector, linear_eval_while_pretraining=linear_eval,
    )  # fmt: skip
    assert convert.read_graph_ft_proj_selector(path) == selector


def test_an_unrecognised_graph_tells_nothing(tmp_path):
    # The classifier's input is a function argument: no chain to follow, so no answer.
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, features):
            with tf.name_scope("head_supervised"):
                return tf.matmul(features, tf.zeros([8, 2]), name="MatMul")

    tf.saved_model.save(Module(), str(tmp_path))
    assert convert.read_graph_ft_proj_selector(str(tmp_path / "saved_model.pb")) is None


def _with_graph(fixture: pathlib.Path, directory: pathlib.Path, selector: int) -> pathlib.Path:
    """The fixture's SavedModel variables next to a graph whose classifier reads `selector`."""
    shutil.copytree(fixture / "saved_model" / "variables", directory / "variables")
    convert.write_original_graph(
        str(directory), features=512, num_proj_layers=3, proj_out_dim=128, num_classes=10, ft_proj_selector=selector
    )
    return directory


def _relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("selector,told_by", [(1, "graph"), (2, "graph"), (2, "flag")])
def test_converted_fine_tuned_model_gives_the_original_logits(tmp_path, selector, told_by):
    """The shared r18 fixture's variables in the original's model fine-tuned with
    --ft_proj_selector=k: tests/tools/data/original_logits_selector<k>.npz holds the logits
    the original code gives on the fixture's `input` (`trainable=False`). Made with the
    original tf2/ code (commit 383d414, TF 2.21, tf_keras): flags --train_mode=finetune
    --ft_proj_selector=k --resnet_depth=18 --width_multiplier=1 --image_size=64
    --num_proj_layers=3 --proj_out_dim=128, `Model(10)` called once, the fixture's
    saved_model/variables restored into it with `tf.train.Checkpoint(model=model)` (which
    with --train_mode=pretrain reproduces the fixture's reference outputs to 5e-7), then
    exported by its run.py `build_saved_model` and called."""
    fixture = _fixture("r18_1x_sk0_64px")
    reference = np.load(fixture / "reference_outputs.npz")
    expected = np.load(REPO / "tests" / "tools" / "data" / f"original_logits_selector{selector}.npz")["logits_sup"]
    # The original's logits with hidden 0 (which the test above reproduces) are far from
    # these: a converter reading the wrong hidden fails here.
    assert _relative_error(reference["logits_sup"], expected) > 0.1
    if told_by == "graph":  # as released: the graph tells, no flag
        conversion = convert.load_original(str(_with_graph(fixture, tmp_path / "saved_model", selector)), image_size=64)
        assert conversion.selector_from.endswith("saved_model.pb")
    else:  # variables only
        conversion = convert.load_original(str(fixture / "saved_model"), image_size=64, ft_proj_selector=selector)
    assert conversion.architecture.ft_proj_selector == selector
    assert _relative_error(conversion.model(reference["input"], training=False)["logits_sup"], expected) < 1e-4


def test_cli_records_the_graph_selector_and_refuses_a_disagreeing_flag(tool, tmp_path, capsys):
    fixture = _fixture("r18_1x_sk0_64px")
    source = _with_graph(fixture, tmp_path / "saved_model", 1)
    args = [f"--source={source}", "--image_size=64"]
    assert tool.main(args + [f"--output_dir={tmp_path / 'bad'}", "--ft_proj_selector=0"]) == 1
    error = capsys.readouterr().err
    assert "--ft_proj_selector=0 disagrees" in error and "reads hidden 1 (projection layer 0)" in error
    assert not (tmp_path / "bad").exists()
    assert tool.main(args + [f"--output_dir={tmp_path / 'ours'}"]) == 0
    assert "--ft_proj_selector=1" in capsys.readouterr().out
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model"]["ft_proj_selector"] == 1
    conversion = json.loads((tmp_path / "ours" / "conversion.json").read_text())
    assert conversion["architecture"]["ft_proj_selector"] == 1
    assert conversion["ft_proj_selector_from"] == str(source / "saved_model.pb")


def test_ambiguous_checkpoint_without_graph_asks_for_ft_proj_selector(tool, tmp_path, capsys):
    _tiny_original(tmp_path / "original" / "ckpt-1")  # hiddens 0..2 are all 128 wide
    assert tool.main([f"--source={tmp_path / 'original'}", f"--output_dir={tmp_path / 'out'}"]) == 1
    error = capsys.readouterr().err
    assert "--ft_proj_selector is needed" in error and "hiddens [0, 1, 2]" in error
    assert not (tmp_path / "out").exists()
    # Only one hidden as wide as the classifier's input: the shapes tell, no flag needed.
    _tiny_original(tmp_path / "single" / "ckpt-1", num_proj_layers=1)
    conversion = convert.load_original(str(tmp_path / "single"))
    assert conversion.architecture.ft_proj_selector == 0 and conversion.selector_from == "shapes"
