"""tools/benchmark.py in a smoke configuration: every figure is reported and plausible."""

import importlib.util
import json
import pathlib
import sys

import pytest

from simclr_tf.models import resnet

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "benchmark.py"


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_figure_and_profiles_the_costly_op_types(tmp_path, capsys):
    # One run for both (each costs ~20 s of tracing).
    tool = _tool()
    tool.main(["--resnet_depth=10", "--width_multiplier=0.25", "--image_size=16",
               "--train_batch_size=8", "--steps=1", "--warmup_steps=1", "--json",
               f"--profile_dir={tmp_path}", "--top_ops=50"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("pipeline_images_per_second", "step_images_per_second", "loop_images_per_second",
                "matmul_gflops_per_second", "conv3x3_gflops_per_second", "peak_rss_gb"):
        assert result[key] > 0, key
    # R18 x0.25 at 16 px: the forward pass is tens of MFLOPs, training 6x that.
    assert 0.005 < result["forward_gflops_per_image"] < 0.1
    assert result["train_gflops_per_image"] == pytest.approx(6 * result["forward_gflops_per_image"])
    assert result["config"]["precision"] == "float32"
    assert "rounds" not in result  # no comparison without --original_dir

    pairs = result["ms_per_step_by_op_type"]
    times = [ms for _, ms in pairs]
    assert times == sorted(times, reverse=True)
    by_type = dict(pairs)
    # The forward conv and both of its gradients (oneDNN's names carry a prefix).
    for op in ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput"):
        assert any(name.endswith(op) and ms > 0 for name, ms in by_type.items()), (op, by_type)
    # Batch norm runs fused exactly when the fused kernel is safe here (not under oneDNN).
    assert any("FusedBatchNorm" in name for name in by_type) == resnet.USE_FUSED_BATCH_NORM, by_type
    assert list(tmp_path.glob("**/*.xplane.pb"))


# A stand-in for the original tf2/run.py: it defines whatever flags it is given, records
# them and the split size TFDS reports, holds ~300 MB, and writes the original's
# "Completed" log lines with made-up times 4 s apart.
FAKE_ORIGINAL = '''
import json
import pathlib
import sys
import sys

from absl import flags

for arg in sys.argv[1:]:
    flags.DEFINE_string(arg[2:].split("=", 1)[0], None, "")
FLAGS = flags.FLAGS


def main(argv):
    import tensorflow_datasets as tfds

    builder = tfds.builder(FLAGS.dataset, data_dir=FLAGS.data_dir)
    record = {**FLAGS.flag_values_dict(), "num_train_examples": builder.info.splits["train"].num_examples}
    pathlib.Path(__file__).with_name("seen.json").write_text(json.dumps(record))
    held = b"x" * (300 * 10**6)
    for step, clock in ((2, "03:00:10.000000"), (4, "03:00:14.000000")):
        print(f"I1202 {clock} 1234 run.py:650] Completed: {step} / 4 steps", file=sys.stderr)
    return len(held) * 0
'''


def test_original_log_lines_give_images_per_second():
    tool = _tool()
    log = ("I0229 23:59:58.500000 1 run.py:650] Completed: 10 / 60 steps\n"
           "some other line\n"
           "I0301 00:00:08.500000 1 run.py:650] Completed: 20 / 60 steps\n")
    # 10 steps of 128 images in 10 s, across midnight of a leap day.
    assert tool.original_images_per_second(log, 128, 10, 20) == pytest.approx(128.0)
    with pytest.raises(RuntimeError, match=r"step\(s\) \[30\]"):
        tool.original_images_per_second(log, 128, 10, 30)


@pytest.mark.slow  # two subprocesses that import TensorFlow
def test_side_by_side_with_a_fake_original(tmp_path, capsys):
    tool = _tool()
    original_dir = tmp_path / "tf2"
    original_dir.mkdir()
    (original_dir / "run.py").write_text(FAKE_ORIGINAL)
    tool.main(["--resnet_depth=10", "--width_multiplier=0.25", "--image_size=16", "--train_batch_size=8",
               "--steps=2", "--warmup_steps=2", "--precisions=float32", "--original_mock_examples=96",
               f"--original_dir={original_dir}", f"--original_python={sys.executable}", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = result["rounds"]
    # Steps 3-4 (2 x 8 images) between the fake's lines 4 s apart.
    assert row["original"]["images_per_second"] == pytest.approx(4.0)
    assert row["original"]["peak_rss_gb"] > 0.3
    assert row["float32"]["images_per_second"] > 0 and row["float32"]["peak_rss_gb"] > 0
    assert row["float32_over_original"] == pytest.approx(row["float32"]["images_per_second"] / 4.0)
    assert result["median"]["float32_over_original"] == pytest.approx(row["float32_over_original"])
    # The original got our configuration, logging every gcd(warmup, steps) steps, on mock data.
    seen = json.loads((original_dir / "seen.json").read_text())
    expected = {"resnet_depth": "10", "width_multiplier": "0.25", "image_size": "16", "train_batch_size": "8",
                "optimizer": "lars", "use_blur": "false", "lineareval_while_pretraining": "true",
                "train_steps": "4", "checkpoint_steps": "2", "dataset": "cifar10", "train_mode": "pretrain"}
    assert {k: seen[k] for k in expected} == expected
    assert seen["num_train_examples"] == 96
    table = tool.comparison_table(result)
    assert "| median | 4.0 |" in table


def test_original_flags_go_together():
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--original_dir=/nowhere"])


def test_ratios_are_taken_within_a_round_and_medians_over_rounds():
    tool = _tool()
    rounds = [{"original": {"images_per_second": 40.0, "peak_rss_gb": 3.0},
               "float32": {"images_per_second": 60.0, "peak_rss_gb": 2.0}},
              {"original": {"images_per_second": 20.0, "peak_rss_gb": 2.0},
               "float32": {"images_per_second": 50.0, "peak_rss_gb": 1.0}},
              {"original": {"images_per_second": 30.0, "peak_rss_gb": 4.0},
               "float32": {"images_per_second": 30.0, "peak_rss_gb": 3.0}}]
    median = tool.add_ratios(rounds, ["float32"])
    assert [row["float32_over_original"] for row in rounds] == pytest.approx([1.5, 2.5, 1.0])
    # The median of the per-round ratios, not the ratio of the medians (50 / 30).
    assert median["float32_over_original"] == pytest.approx(1.5)
    assert median["original"] == pytest.approx({"images_per_second": 30.0, "peak_rss_gb": 3.0})
    assert median["float32"] == pytest.approx({"images_per_second": 50.0, "peak_rss_gb": 2.0})


def test_convolution_flops_are_counted_forward_backward_and_inside_calls():
    import tensorflow as tf

    tool = _tool()
    kernel = tf.Variable(tf.ones([3, 3, 3, 4]))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 2, "SAME"))  # a (2, 4, 4, 4) output
        return tape.gradient(loss, [x, kernel])

    spec = tf.TensorSpec([2, 8, 8, 3])
    one_conv = 2.0 * (2 * 4 * 4 * 4) * (3 * 3 * 3)  # output elements x kh kw c_in, x 2
    expected = {"Conv2D": one_conv, "Conv2DBackpropInput": one_conv, "Conv2DBackpropFilter": one_conv}
    assert tool.conv_flops_by_type(tf.function(step).get_concrete_function(spec).graph) == expected
    # The same step compiled (--jit_compile) is a call inside the traced graph.
    compiled = tf.function(step, jit_compile=True)
    assert tool.conv_flops_by_type(tf.function(lambda x: compiled(x)).get_concrete_function(spec).graph) == expected


def _semi_counts(tool, mode: str, batch_size: int, mu: int) -> dict:
    import tempfile

    from simclr_tf.train import trainer
    from simclr_tf.train.experiment import Experiment

    args = tool.parse_args([f"--train_mode={mode}", f"--train_batch_size={batch_size}",
                            f"--unlabeled_batch_ratio={mu}", "--width_multiplier=0.25", "--image_size=16"])
    config = tool.benchmark_config(args)
    with tempfile.TemporaryDirectory() as model_dir:
        experiment = Experiment.create(config, model_dir)
        state = trainer.build_train_state(experiment)
        batch = next(iter(experiment.train_dataset()))
        return tool.step_image_counts(experiment.strategy, trainer.make_train_step(experiment, state), batch,
                                      state.model, config.model.image_size)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # B = 2 labeled, mu B = 2 unlabeled in one view, each in its 4 rotations, all trained.
        ("s4l", {"input_images_per_step": 4, "model_images_per_step": 16, "trained_images_per_step": 16}),
        # Student: labeled + one unlabeled view, trained; the teacher: the other view, forward only.
        ("mean_teacher", {"input_images_per_step": 6, "model_images_per_step": 6, "trained_images_per_step": 4}),
    ],
)
def test_images_per_step_follow_what_the_step_feeds_the_model(mode, expected):
    tool = _tool()
    assert _semi_counts(tool, mode, batch_size=2, mu=1) == pytest.approx(expected)


def test_semi_mode_reports_every_figure_with_its_images_per_step(capsys):
    tool = _tool()
    tool.main(["--train_mode=fixmatch", "--unlabeled_batch_ratio=2", "--labeled_fraction=0.02",
               "--resnet_depth=10", "--width_multiplier=0.25", "--image_size=16",
               "--train_batch_size=4", "--steps=1", "--warmup_steps=1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4 labeled (weak) + 2 x 8 unlabeled (weak and strong), all through forward and backward.
    assert result["images_per_step"] == 4
    assert result["input_images_per_step"] == 4 + 2 * 8
    assert result["model_images_per_step"] == pytest.approx(4 + 2 * 8)
    assert result["trained_images_per_step"] == pytest.approx(4 + 2 * 8)
    forward = result["forward_gflops_per_image"]
    assert result["train_gflops_per_step"] == pytest.approx(forward * (20 + 2 * 20))
    assert result["train_gflops_per_image"] == pytest.approx(result["train_gflops_per_step"] / 4)
    # Labeled and all-view rates are the same steps per second.
    assert result["pipeline_input_images_per_second"] == pytest.approx(5 * result["pipeline_images_per_second"])
    assert result["step_model_images_per_second"] == pytest.approx(5 * result["step_images_per_second"])
    assert result["pipeline_over_step"] == pytest.approx(
        result["pipeline_images_per_second"] / result["step_images_per_second"])
    for key in ("loop_images_per_second", "step_gflops_per_second", "peak_rss_gb"):
        assert result[key] > 0, key
    assert result["config"]["train_mode"] == "fixmatch"


def test_original_comparison_is_for_pretraining_only(tmp_path, capsys):
    tool = _tool()
    (tmp_path / "run.py").write_text("")
    tool.parse_args([f"--original_dir={tmp_path}", "--original_python=python"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--train_mode=fixmatch", f"--original_dir={tmp_path}", "--original_python=python"])
    assert "--train_mode=fixmatch" in capsys.readouterr().err
