"""Throughput of the pretraining step on this machine, against its practical peak.

Measures, for one configuration (images counted once, whatever the number of views):
  (a) the input pipeline alone, (b) the training step on one in-memory batch repeated,
  (c) the training loop as run.py runs it (pipeline + step + metrics);
and the model's FLOPs per image (forward pass from the graph, training ~ 3x forward per
view), the step's achieved FLOP/s, and a dense matmul and a plain 3x3 convolution timed
in the same process as the machine's practical peak. Also peak RSS, and with
--profile_dir the time per op type from a profiler trace.

  python tools/benchmark.py --dataset=folder:../shared/datasets/cifar10 --eval_split='train[90%:]' \
      --resnet_depth=18 --width_multiplier=1 --train_batch_size=128 [--precision=mixed_bfloat16] \
      [--jit_compile] [--json] [--profile_dir=/tmp/profile]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from simclr_tf.config import Config  # noqa: E402
from simclr_tf.train import trainer  # noqa: E402
from simclr_tf.train.experiment import Experiment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation", help="Must exist; it is not read.")
    parser.add_argument("--resnet_depth", type=int, default=18)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
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
    return parser.parse_args(argv)


def benchmark_config(args: argparse.Namespace) -> Config:
    return Config.demo().replace(
        model={"resnet_depth": args.resnet_depth, "width_multiplier": args.width_multiplier,
               "image_size": args.image_size},
        data={"dataset": args.dataset, "train_split": args.train_split,
              "eval_split": args.eval_split, "use_blur": args.use_blur},
        train={"train_mode": "pretrain", "mode": "train", "train_batch_size": args.train_batch_size,
               "train_steps": 10**6, "lineareval_while_pretraining": not args.no_linear_eval,
               "keep_hub_module_max": 0},
        runtime={"precision": args.precision, "jit_compile": args.jit_compile},
    )


def _seconds(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def pipeline_images_per_second(experiment: Experiment, batch_size: int, steps: int, warmup: int) -> float:
    iterator = iter(experiment.train_dataset())
    for _ in range(warmup):
        next(iterator)
    return batch_size / _seconds(lambda: next(iterator), steps)


def forward_flops_per_image(model, image_size: int) -> float:
    """2 x multiply-adds of one forward pass, from the traced graph."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


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


def run(args: argparse.Namespace) -> dict:
    config = benchmark_config(args)
    batch = config.train.train_batch_size
    with tempfile.TemporaryDirectory() as model_dir:
        experiment = Experiment.create(config, model_dir)
        state = trainer.build_train_state(experiment)
        step_fn = trainer.make_train_step(experiment, state)
        strategy = experiment.strategy

        pipeline = pipeline_images_per_second(experiment, batch, args.steps * 3, args.warmup_steps)

        fixed_batch = next(iter(experiment.train_dataset()))

        @tf.function
        def repeated_step(num_steps):
            for _ in tf.range(num_steps):
                strategy.run(step_fn, args=(fixed_batch,))

        repeated_step(tf.constant(args.warmup_steps))
        start = time.perf_counter()
        repeated_step(tf.constant(args.steps))
        _ = state.optimizer.iterations.numpy()
        step_only = batch * args.steps / (time.perf_counter() - start)

        # The training loop's own tf.function (metrics, NaN guard), as run.py runs it.
        _, run_steps = trainer.make_training_loop(experiment, state)
        iterator = iter(experiment.train_dataset())
        run_steps(iterator, tf.constant(args.warmup_steps))
        start = time.perf_counter()
        run_steps(iterator, tf.constant(args.steps))
        _ = state.optimizer.iterations.numpy()
        whole_loop = batch * args.steps / (time.perf_counter() - start)

        forward = forward_flops_per_image(state.model, config.model.image_size)
        top_ops = []
        if args.profile_dir:
            tf.profiler.experimental.start(args.profile_dir)
            repeated_step(tf.constant(args.steps))
            _ = state.optimizer.iterations.numpy()
            tf.profiler.experimental.stop()
            top_ops = op_time_by_type(latest_xplane(args.profile_dir), args.top_ops, args.steps)
    # Training: forward + backward (~2x forward) for each of the two views.
    train_flops = 3 * 2 * forward
    peaks = peak_flops(args.steps)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "pipeline_images_per_second": pipeline,
        "step_images_per_second": step_only,
        "loop_images_per_second": whole_loop,
        "forward_gflops_per_image": forward / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, sort_keys=True) if args.json else table(result))


if __name__ == "__main__":
    main()
