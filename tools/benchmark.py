"""Throughput of a train mode's step on this machine, against its practical peak.

Measures, for one configuration and --train_mode (pretrain or a semi-supervised mode):
  (a) the input pipeline alone, (b) the training step on one in-memory batch repeated,
  (c) the training loop as run.py runs it (pipeline + step + metrics);
and the model's FLOPs per image (forward pass from the graph), the step's FLOPs and
achieved FLOP/s, and a dense matmul and a plain 3x3 convolution timed in the same
process as the machine's practical peak. Also peak RSS, and with --profile_dir the time
per op type from a profiler trace.

What "images" means. `*_images_per_second` count the step's --train_batch_size
examples (B), each once: pretrain's images whatever the number of views, the
semi-supervised modes' labeled images. Per step the tool also reports, whatever the mode:
  input_images_per_step    every image the pipeline delivers, all views (from the batch's
                           shapes): pretrain 2B; fixmatch B + 2 mu B; s4l B + mu B;
  model_images_per_step    images through the model's forward passes in one step, and
  trained_images_per_step  those the backward pass also goes through, both counted from
                           the traced step (its convolutions' FLOPs over one image's), so
                           s4l's four rotations and mean_teacher's forward-only teacher
                           pass count as the step runs them;
and `pipeline_input_images_per_second` (all views) and `step_model_images_per_second`.
Training FLOPs per step = forward FLOPs per image x (model + 2 x trained images);
pipeline_over_step is the same whichever unit, both being steps per second.

  python tools/benchmark.py --dataset=folder:../shared/datasets/cifar10 --eval_split='train[90%:]' \
      --resnet_depth=18 --width_multiplier=1 --train_batch_size=128 [--precision=mixed_bfloat16] \
      [--jit_compile] [--json] [--profile_dir=/tmp/profile]

With --original_dir and --original_python (the original google-research/simclr tf2/ code and a
Python that runs it), it instead times the original's run.py and this code's training loop
side by side, interleaved over --repeats rounds, and reports the ratios (README, "Against the
original code").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import simclr_tf  # noqa: E402,F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
import tensorflow as tf  # noqa: E402

from simclr_tf.config import SEMI_SUPERVISED_FROM_CHECKPOINT_MODES, SEMI_SUPERVISED_MODES, Config  # noqa: E402
from simclr_tf.train import trainer  # noqa: E402
from simclr_tf.train.experiment import Experiment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_mode", default="pretrain", choices=TRAIN_MODES,
                        help="The train mode timed (finetune and distill need a checkpoint: not here).")
    parser.add_argument("--unlabeled_batch_ratio", type=int, default=7,
                        help="Semi-supervised modes: unlabeled images per labeled one (mu).")
    parser.add_argument("--labeled_fraction", type=float, default=0.01,
                        help="Semi-supervised and supervised modes: the labeled subset of --train_split.")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation", help="Must exist; it is not read.")
    parser.add_argument("--resnet_depth", type=int, default=18)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--backbone", default="resnet", choices=("resnet", "vit"))
    parser.add_argument("--vit_size", default="tiny", help="With --backbone=vit: tiny, small or base.")
    parser.add_argument("--patch_size", type=int, default=4, help="With --backbone=vit (4 for 32 px).")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--use_blur", action="store_true")
    parser.add_argument("--no_linear_eval", action="store_true")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps (after warm-up ones).")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("--profile_dir", default="",
                        help="Also trace --steps steps with the TF profiler into this directory "
                             "(TensorBoard's Profile tab reads it) and report the op types that took the most time.")
    parser.add_argument("--top_ops", type=int, default=15, help="Op types listed with --profile_dir.")
    parser.add_argument("--loop_only", action="store_true",
                        help="Time only the training loop (what --original_dir compares).")
    original = parser.add_argument_group(
        "the original SimCLR code, side by side (optional; it is not a dependency)")
    original.add_argument("--original_dir", default="",
                          help="The original's tf2/ directory (google-research/simclr). With it, the tool "
                               "times the original's run.py and this code's training loop, interleaved, "
                               "in separate processes, and reports the ratios.")
    original.add_argument("--original_python", default="",
                          help="A Python with the original's requirements: tensorflow, tf_keras, tensorflow-datasets, tensorboard.")
    original.add_argument("--repeats", type=int, default=1,
                          help="Rounds of (original, ours in each of --precisions).")
    original.add_argument("--precisions", default="float32,mixed_bfloat16",
                          help="Our precisions timed in each round.")
    original.add_argument("--original_mock_examples", type=int, default=2560,
                          help="Size of the TFDS mock CIFAR-10 the original reads.")
    args = parser.parse_args(argv)
    if bool(args.original_dir) != bool(args.original_python):
        parser.error("--original_dir and --original_python go together (the original's tf2/ directory and "
                     "a Python that can run it)")
    if args.original_dir and not (pathlib.Path(args.original_dir) / "run.py").is_file():
        parser.error(f"--original_dir={args.original_dir}: no run.py there; give the original's tf2/ directory")
    if args.original_dir and args.train_mode != "pretrain":
        parser.error(f"--original_dir times pretraining only; drop --train_mode={args.train_mode}")
    if args.original_dir and args.profile_dir:
        parser.error("--profile_dir does not go with --original_dir; profile without it")
    return args


# Finetune, distill and semivit start from a checkpoint, which a throughput tool does not make.
TRAIN_MODES = ("pretrain", "supervised", *(m for m in SEMI_SUPERVISED_MODES if m not in SEMI_SUPERVISED_FROM_CHECKPOINT_MODES))

# Settings that are not benchmark options, given explicitly so that the measured
# configuration does not follow Config's defaults; the same values go to the original
# (original_flags): the original README's CIFAR-10 recipe, LARS.
FIXED_MODEL = {"sk_ratio": 0.0, "se_ratio": 0.0, "batch_norm_decay": 0.9, "global_bn": True,
               "proj_head_mode": "nonlinear", "proj_out_dim": 128, "num_proj_layers": 3,
               "ft_proj_selector": 0}
FIXED_DATA = {"cache_dataset": True, "color_jitter_strength": 0.5}
FIXED_OPTIM = {"optimizer": "lars", "learning_rate": 1.0, "learning_rate_scaling": "linear",
               "warmup_epochs": 10.0, "weight_decay": 1e-4, "momentum": 0.9}
FIXED_TRAIN = {"temperature": 0.5, "hidden_norm": True}


def benchmark_config(args: argparse.Namespace) -> Config:
    return Config.demo().replace(
        model={"resnet_depth": args.resnet_depth, "width_multiplier": args.width_multiplier,
               "image_size": args.image_size, "backbone": args.backbone, "vit_size": args.vit_size,
               "patch_size": args.patch_size, **FIXED_MODEL},
        data={"dataset": args.dataset, "train_split": args.train_split,
              "eval_split": args.eval_split, "use_blur": args.use_blur,
              "labeled_fraction": args.labeled_fraction, **FIXED_DATA},
        optim=FIXED_OPTIM,
        semi={"unlabeled_batch_ratio": args.unlabeled_batch_ratio},
        train={"train_mode": args.train_mode, "mode": "train", "train_batch_size": args.train_batch_size,
               "train_steps": 10**6, "lineareval_while_pretraining": not args.no_linear_eval,
               "keep_hub_module_max": 0, **FIXED_TRAIN},
        runtime={"precision": args.precision, "jit_compile": args.jit_compile},
    )


def _seconds(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def pipeline_steps_per_second(experiment: Experiment, steps: int, warmup: int) -> float:
    iterator = iter(experiment.train_dataset())
    for _ in range(warmup):
        next(iterator)
    return 1.0 / _seconds(lambda: next(iterator), steps)


def forward_flops_per_image(model, image_size: int) -> float:
    """2 x multiply-adds of one forward pass, from the traced graph."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


CONV_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")


def conv_flops_by_type(graph) -> dict[str, float]:
    """2 x multiply-adds of the 2-D convolutions in `graph` (and the functions it calls), by op type.

    Each of the three ops does (output-gradient or output elements) x kh x kw x c_in
    multiply-adds; shapes must be static (NHWC), as the step's are.
    """
    totals = dict.fromkeys(CONV_OPS, 0.0)
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):  # e.g. the --jit_compile step
            for op_type, flops in conv_flops_by_type(graph._get_function(op.get_attr("f").name).graph).items():
                totals[op_type] += flops
        if op.type not in CONV_OPS:
            continue
        # The kernel, and the output (Conv2D) or the output's gradient (the other two).
        if op.type == "Conv2D":
            kernel, output = op.inputs[1], op.outputs[0]
        elif op.type == "Conv2DBackpropInput":
            kernel, output = op.inputs[1], op.inputs[2]
        else:
            kernel, output = op.outputs[0], op.inputs[2]
        kernel_shape, output_shape = kernel.shape.as_list(), output.shape.as_list()
        if None in kernel_shape + output_shape:
            raise ValueError(f"{op.name}: shapes {kernel_shape} / {output_shape} are not static; "
                             "the step's images cannot be counted")
        totals[op.type] += 2.0 * math.prod(output_shape) * math.prod(kernel_shape[:3])
    return totals


def images_through_model(step_graph, model, image_size: int) -> tuple[float, float]:
    """(images the step's forward passes process, images its backward pass goes through).

    Counted as the step's forward (resp. filter-gradient) convolution FLOPs over those of
    one image's forward pass: a forward-only pass (a teacher) counts once in the first,
    not in the second; every image fed to the model counts, rotations and views included.
    """
    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    one = conv_flops_by_type(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph)
    step = conv_flops_by_type(step_graph)
    return step["Conv2D"] / one["Conv2D"], step["Conv2DBackpropFilter"] / one["Conv2D"]


def input_images_per_step(batch) -> int:
    """Images of every view in a batch: the leading sizes of its (N, H, W, C) tensors."""
    return sum(int(t.shape[0]) for t in tf.nest.flatten(batch) if t.shape.rank == 4)


def step_image_counts(strategy: tf.distribute.Strategy, step_fn, batch, model, image_size: int) -> dict[str, float]:
    """input / model / trained images per step (see the module docstring), of `step_fn` on `batch`."""
    one_step = tf.function(lambda b: strategy.run(step_fn, args=(b,)))
    model_images, trained_images = images_through_model(
        one_step.get_concrete_function(batch).graph, model, image_size)
    return {"input_images_per_step": input_images_per_step(batch),
            "model_images_per_step": model_images, "trained_images_per_step": trained_images}


def peak_flops(steps: int) -> dict[str, float]:
    """FLOP/s of a 2048^2 matmul and a 3x3 conv (64x32x32x128 -> 128) in this process."""
    a = tf.random.normal([2048, 2048])
    matmul = tf.function(lambda: tf.matmul(a, a))
    x = tf.random.normal([64, 32, 32, 128])
    k = tf.random.normal([3, 3, 128, 128])
    conv = tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME"))
    results = {}
    for name, fn, flops in (("matmul", matmul, 2 * 2048**3), ("conv3x3", conv, 2 * 64 * 32 * 32 * 9 * 128 * 128)):
        fn().numpy()
        results[name] = flops / _seconds(lambda: fn().numpy(), max(steps, 3))
    return results


def loop_steps_per_second(experiment: Experiment, state, steps: int, warmup: int) -> float:
    """The training loop's own tf.function (metrics, NaN guard), as run.py runs it."""
    _, run_steps = trainer.make_training_loop(experiment, state)
    iterator = iter(experiment.train_dataset())
    run_steps(iterator, tf.constant(warmup))
    _ = state.optimizer.iterations.numpy()
    start = time.perf_counter()
    run_steps(iterator, tf.constant(steps))
    _ = state.optimizer.iterations.numpy()
    return steps / (time.perf_counter() - start)


def run_loop_only(args: argparse.Namespace) -> dict:
    config = benchmark_config(args)
    batch = config.train.train_batch_size
    with tempfile.TemporaryDirectory() as model_dir:
        experiment = Experiment.create(config, model_dir)
        state = trainer.build_train_state(experiment)
        loop = batch * loop_steps_per_second(experiment, state, args.steps, args.warmup_steps)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "loop_images_per_second": loop,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def run(args: argparse.Namespace) -> dict:
    if args.loop_only:
        return run_loop_only(args)
    config = benchmark_config(args)
    batch = config.train.train_batch_size
    with tempfile.TemporaryDirectory() as model_dir:
        experiment = Experiment.create(config, model_dir)
        state = trainer.build_train_state(experiment)
        step_fn = trainer.make_train_step(experiment, state)
        strategy = experiment.strategy

        pipeline = pipeline_steps_per_second(experiment, args.steps * 3, args.warmup_steps)

        fixed_batch = next(iter(experiment.train_dataset()))

        @tf.function
        def repeated_step(num_steps):
            for _ in tf.range(num_steps):
                strategy.run(step_fn, args=(fixed_batch,))

        repeated_step(tf.constant(args.warmup_steps))
        start = time.perf_counter()
        repeated_step(tf.constant(args.steps))
        _ = state.optimizer.iterations.numpy()
        step_only = args.steps / (time.perf_counter() - start)

        whole_loop = loop_steps_per_second(experiment, state, args.steps, args.warmup_steps)

        forward = forward_flops_per_image(state.model, config.model.image_size)
        counts = step_image_counts(strategy, step_fn, fixed_batch, state.model, config.model.image_size)
        top_ops = []
        if args.profile_dir:
            tf.profiler.experimental.start(args.profile_dir)
            repeated_step(tf.constant(args.steps))
            _ = state.optimizer.iterations.numpy()
            tf.profiler.experimental.stop()
            top_ops = op_time_by_type(latest_xplane(args.profile_dir), args.top_ops, args.steps)
    # Forward for every image the step feeds the model, backward (~2x forward) for the trained ones.
    train_flops = forward * (counts["model_images_per_step"] + 2 * counts["trained_images_per_step"])
    peaks = peak_flops(args.steps)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "pipeline_images_per_second": batch * pipeline,
        "step_images_per_second": batch * step_only,
        "loop_images_per_second": batch * whole_loop,
        "images_per_step": batch,
        **counts,
        "pipeline_input_images_per_second": counts["input_images_per_step"] * pipeline,
        "step_model_images_per_second": counts["model_images_per_step"] * step_only,
        "forward_gflops_per_image": forward / 1e9,
        "train_gflops_per_step": train_flops / 1e9,
        "train_gflops_per_image": train_flops / batch / 1e9,
        "step_gflops_per_second": train_flops * step_only / 1e9,
        "matmul_gflops_per_second": peaks["matmul"] / 1e9,
        "conv3x3_gflops_per_second": peaks["conv3x3"] / 1e9,
        "step_fraction_of_conv3x3": train_flops * step_only / peaks["conv3x3"],
        "pipeline_over_step": pipeline / step_only,
        # Linux reports kilobytes.
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        **({"ms_per_step_by_op_type": top_ops} if top_ops else {}),
    }


def latest_xplane(profile_dir: str) -> str:
    paths = sorted(pathlib.Path(profile_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"--profile_dir={profile_dir}: the profiler wrote no *.xplane.pb there")
    return str(paths[-1])


def op_time_by_type(xplane_path: str, top: int, steps: int) -> list[tuple[str, float]]:
    """(op type, milliseconds per step) summed over threads, the largest first."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(pathlib.Path(xplane_path).read_bytes())
    totals: dict[str, float] = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are "<op name>:<op type>"; runtime events look like "A::B" or "A: B".
                if ":" not in name or "::" in name or ": " in name:
                    continue
                op_type = name.rsplit(":", 1)[1]
                totals[op_type] = totals.get(op_type, 0.0) + event.duration_ps / 1e9 / steps
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if k not in ("config", "ms_per_step_by_op_type")]
    width = max(len(k) for k, _ in rows)
    lines = [f"config: {json.dumps(result['config'], sort_keys=True)}"]
    lines += [f"{k.ljust(width)}  {v:10.2f}" for k, v in rows]
    if "ms_per_step_by_op_type" in result:
        lines.append("ms per step by op type (summed over threads):")
        lines += [f"  {k.ljust(width - 2)}  {v:10.1f}" for k, v in result["ms_per_step_by_op_type"]]
    return "\n".join(lines)


# Written to a temporary file and run with --original_python: runs the original's own
# run.py main, unmodified, on TFDS mock CIFAR-10 (random images of the dataset's shapes),
# so that nothing is downloaded. The original reads the split sizes from the dataset's
# metadata, which mock data lacks: they are written to a data_dir first (the original
# gets it as --data_dir). argv: the original's tf2/ directory, the number of mock
# examples per split, the data_dir, then the original's flags.
ORIGINAL_LAUNCHER = """\
import os
import sys

original_dir, num_examples, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, original_dir)
sys.argv = [os.path.join(original_dir, "run.py")] + sys.argv[4:]

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app

import run  # the original's module; importing it defines its flags

builder = tfds.builder("cifar10", data_dir=data_dir)
builder.info.set_splits(tfds.core.SplitDict([
    tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0, filename_template=None)
    for name in ("train", "test")]))
os.makedirs(builder.data_dir, exist_ok=True)
builder.info.write_to_directory(builder.data_dir)

tf.config.set_soft_device_placement(True)  # as the original's __main__ block does
with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir):
    app.run(run.main)
"""

# absl's log prefix ("I1202 03:10:02.123456 140 run.py:650] ") and the line the original's
# run.py writes after each --checkpoint_steps steps (and a checkpoint save).
_COMPLETED = re.compile(r"^[IWEF](\d{4} \d{2}:\d{2}:\d{2}\.\d{6}) .*\] Completed: (\d+) / \d+ steps")


def completed_step_times(log: str) -> dict[int, float]:
    """{step: seconds} from the original's "Completed: N / M steps" log lines."""
    times = {}
    for line in log.splitlines():
        match = _COMPLETED.match(line)
        if match:
            # The prefix has no year; a leap year accepts Feb 29. Only differences are used.
            when = datetime.datetime.strptime("2000" + match.group(1), "%Y%m%d %H:%M:%S.%f")
            times[int(match.group(2))] = (when - datetime.datetime(2000, 1, 1)).total_seconds()
    return times


def original_images_per_second(log: str, batch_size: int, first: int, last: int) -> float:
    """Images/s between the original's log lines after step `first` and step `last`."""
    times = completed_step_times(log)
    missing = [step for step in (first, last) if step not in times]
    if missing:
        raise RuntimeError(f"the original's log has no 'Completed: N / M steps' line for step(s) {missing} "
                           f"(found {sorted(times)})")
    seconds = times[last] - times[first]
    if seconds <= 0:
        raise RuntimeError(f"the original's log times do not increase from step {first} to {last}")
    return batch_size * (last - first) / seconds


def original_flags(args: argparse.Namespace, work: pathlib.Path, log_every: int) -> list[str]:
    """The original run.py's flags for the configuration benchmark_config builds."""
    values = {
        "train_mode": "pretrain", "mode": "train", "use_tpu": False, "model_dir": work / "model_dir",
        "dataset": "cifar10", "data_dir": work / "data", "train_split": "train", "eval_split": "test",
        "resnet_depth": args.resnet_depth, "width_multiplier": args.width_multiplier,
        "image_size": args.image_size, "train_batch_size": args.train_batch_size,
        "use_blur": args.use_blur, "lineareval_while_pretraining": not args.no_linear_eval,
        "train_steps": args.warmup_steps + args.steps, "checkpoint_steps": log_every,
        "keep_hub_module_max": 0,
        **FIXED_MODEL, **FIXED_DATA, **FIXED_OPTIM, **FIXED_TRAIN,
    }
    return [f"--{name}={_flag_value(value)}" for name, value in values.items()]


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    # "1" rather than "1.0": the original defines --width_multiplier as an integer.
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_measured(command: list[str], env: dict[str, str], stdout_path: pathlib.Path,
                 stderr_path: pathlib.Path) -> tuple[int, float]:
    """Runs `command`; returns its exit code and peak RSS in GB (its own, from wait4)."""
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports kilobytes.
    return process.returncode, usage.ru_maxrss / 1e6


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def time_original(args: argparse.Namespace, launcher: pathlib.Path, work: pathlib.Path, log_every: int) -> dict:
    work.mkdir()
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [args.original_python, str(launcher), str(pathlib.Path(args.original_dir).resolve()),
               str(args.original_mock_examples), str(work / "data"), *original_flags(args, work, log_every)]
    code, rss = run_measured(command, env, work / "stdout.txt", work / "log.txt")
    log = (work / "stdout.txt").read_text(errors="replace") + (work / "log.txt").read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"the original's run.py failed (exit code {code}): {' '.join(command)}\n"
                           f"end of its log:\n{_tail(work / 'log.txt')}")
    speed = original_images_per_second(log, args.train_batch_size, args.warmup_steps,
                                       args.warmup_steps + args.steps)
    return {"images_per_second": speed, "peak_rss_gb": rss}


def time_ours(args: argparse.Namespace, precision: str, work: pathlib.Path) -> dict:
    work.mkdir()
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--loop_only", "--json",
               f"--precision={precision}", f"--dataset={args.dataset}", f"--train_split={args.train_split}",
               f"--eval_split={args.eval_split}", f"--resnet_depth={args.resnet_depth}",
               f"--width_multiplier={args.width_multiplier}", f"--image_size={args.image_size}",
               f"--train_batch_size={args.train_batch_size}", f"--steps={args.steps}",
               f"--warmup_steps={args.warmup_steps}",
               *(["--use_blur"] if args.use_blur else []), *(["--no_linear_eval"] if args.no_linear_eval else []),
               *(["--jit_compile"] if args.jit_compile else [])]
    code, rss = run_measured(command, dict(os.environ), work / "stdout.txt", work / "log.txt")
    if code != 0:
        raise RuntimeError(f"tools/benchmark.py --loop_only --precision={precision} failed (exit code {code})\n"
                           f"end of its log:\n{_tail(work / 'log.txt')}")
    result = json.loads((work / "stdout.txt").read_text().strip().splitlines()[-1])
    return {"images_per_second": result["loop_images_per_second"], "peak_rss_gb": rss}


def add_ratios(rounds: list[dict], precisions: list[str]) -> dict:
    """Adds "<precision>_over_original" (ours / original, same round) to each round; returns the medians."""
    for row in rounds:
        for precision in precisions:
            row[f"{precision}_over_original"] = (
                row[precision]["images_per_second"] / row["original"]["images_per_second"])
    median = {key: {field: statistics.median(row[key][field] for row in rounds)
                    for field in ("images_per_second", "peak_rss_gb")}
              for key in ("original", *precisions)}
    for precision in precisions:
        key = f"{precision}_over_original"
        median[key] = statistics.median(row[key] for row in rounds)
    return median


def compare_with_original(args: argparse.Namespace) -> dict:
    """Rounds of (the original, ours in each precision), each in its own process, back to back.

    Both sides time steps warmup_steps+1 .. warmup_steps+steps. The original is timed from
    its own log lines, written every gcd(warmup_steps, steps) steps after a checkpoint save
    (which the timed span includes); ours is the training loop, without checkpoints.
    """
    if args.warmup_steps < 1 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--warmup_steps, --steps and --repeats must be at least 1 with --original_dir")
    precisions = [p for p in args.precisions.split(",") if p]
    log_every = math.gcd(args.warmup_steps, args.steps)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="benchmark_original_") as work_dir:
        work = pathlib.Path(work_dir)
        launcher = work / "launch_original.py"
        launcher.write_text(ORIGINAL_LAUNCHER)
        for index in range(args.repeats):
            row = {"original": time_original(args, launcher, work / f"original_{index}", log_every)}
            print(f"round {index + 1}: original {row['original']}", file=sys.stderr, flush=True)
            for precision in precisions:
                row[precision] = time_ours(args, precision, work / f"{precision}_{index}")
                print(f"round {index + 1}: {precision} {row[precision]}", file=sys.stderr, flush=True)
            rounds.append(row)
    median = add_ratios(rounds, precisions)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "profile_dir", "top_ops", "loop_only")}
    return {"config": config, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "original_log_every_steps": log_every, "precisions": precisions, "rounds": rounds, "median": median}


def comparison_table(result: dict) -> str:
    """A Markdown table: one row per round and the medians."""
    precisions = result["precisions"]
    sides = ["original", *precisions]
    header = (["round"] + [f"{side}, images/s" for side in sides]
              + [f"{p} / original" for p in precisions] + [f"{side}, peak RSS GB" for side in sides])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in [(str(i + 1), r) for i, r in enumerate(result["rounds"])] + [("median", result["median"])]:
        cells = ([name] + [f"{row[side]['images_per_second']:.1f}" for side in sides]
                 + [f"{row[f'{p}_over_original']:.2f}x" for p in precisions]
                 + [f"{row[side]['peak_rss_gb']:.2f}" for side in sides])
        lines.append("| " + " | ".join(cells) + " |")
    return f"measured {result['date']}\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.original_dir:
        result = compare_with_original(args)
        print(json.dumps(result, sort_keys=True) if args.json else comparison_table(result))
        return
    result = run(args)
    print(json.dumps(result, sort_keys=True) if args.json else table(result))


if __name__ == "__main__":
    main()
