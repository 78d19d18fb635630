"""Does --precision=mixed_bfloat16 (or mixed_float16) train like float32? Short pretraining runs.

Trains `--runs` pretraining runs per precision (each with its own random initialisation,
augmentations and --seed for the data order) and compares their logged training curves.
"Within noise" is judged against float32 itself: the gap between the low-precision and the
float32 mean curve is compared with the gap between two float32 runs.

Writes report.md, report.png (the curves) and report.json into --output_dir; a run whose
model_dir already reached --steps is reused, so an interrupted report continues.

  python tools/compare_precision.py --dataset=folder:../shared/datasets/cifar10 \
      --train_split='train[:90%]' --eval_split='train[90%:]' --steps=100 \
      --output_dir=docs/precision_cifar10
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CURVES = ("train/contrast_loss", "train/contrast_acc", "train/supervised_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="folder:../shared/datasets/cifar10")
    parser.add_argument("--train_split", default="train[:90%]")
    parser.add_argument("--eval_split", default="train[90%:]")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--runs", type=int, default=3, help="Runs per precision (at least 2 for float32's noise).")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log_every_steps", type=int, default=5)
    parser.add_argument("--resnet_depth", type=int, default=18)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--output_dir", default="runs/compare_precision")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if "float32" not in precisions or args.runs < 2:
        parser.error("--precisions must include float32 and --runs must be >= 2: float32's run-to-run "
                     "difference is the noise the others are judged against")
    return args


def run_config(args: argparse.Namespace, precision: str, seed: int):
    from simclr_tf.config import Config

    return Config.demo().replace(
        model={"resnet_depth": args.resnet_depth, "width_multiplier": args.width_multiplier,
               "image_size": args.image_size},
        data={"dataset": args.dataset, "train_split": args.train_split, "eval_split": args.eval_split,
              "use_blur": False},
        train={"train_mode": "pretrain", "mode": "train", "train_steps": args.steps,
               "train_batch_size": args.train_batch_size, "seed": seed,
               "lineareval_while_pretraining": True, "log_every_steps": args.log_every_steps,
               "checkpoint_steps": args.steps, "keep_hub_module_max": 0},
        runtime={"precision": precision},
    )


def read_curves(model_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the CURVES scalars in model_dir's event files."""
    import tensorflow as tf

    curves: dict[str, dict[int, float]] = {tag: {} for tag in CURVES}
    for path in sorted(glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in curves:
                    curves[value.tag][int(event.step)] = float(tf.make_ndarray(value.tensor))
    return curves


def train_run(args: argparse.Namespace, precision: str, seed: int) -> dict:
    import tensorflow as tf

    from simclr_tf.train import train_and_evaluate

    model_dir = os.path.join(args.output_dir, "runs", f"{precision}_seed{seed}")
    latest = tf.train.latest_checkpoint(model_dir)
    seconds = None
    if not (latest and latest.endswith(f"ckpt-{args.steps}")):
        start = time.perf_counter()
        train_and_evaluate(run_config(args, precision, seed), model_dir)
        seconds = time.perf_counter() - start
    curves = read_curves(model_dir)
    print(f"[compare_precision] {model_dir}: final contrast_loss "
          f"{curves['train/contrast_loss'][max(curves['train/contrast_loss'])]:.4f}", flush=True)
    return {"precision": precision, "seed": seed, "model_dir": model_dir, "seconds": seconds, "curves": curves}


def mean_abs_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """Mean |a - b| over the steps both curves logged."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError("the two curves share no logged step")
    return sum(abs(a[s] - b[s]) for s in steps) / len(steps)


def _pair_gaps(runs_a: list[dict], runs_b: list[dict] | None, tag: str) -> list[float]:
    """Gaps between every two runs of runs_a (runs_b None), or between every run of a and of b."""
    if runs_b is None:
        return [mean_abs_gap(a["curves"][tag], b["curves"][tag])
                for i, a in enumerate(runs_a) for b in runs_a[i + 1:]]
    return [mean_abs_gap(a["curves"][tag], b["curves"][tag]) for a in runs_a for b in runs_b]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(runs: list[dict]) -> dict:
    """Per curve: run-to-run gaps within each precision, and between each precision and float32.

    Every run has its own initialisation and augmentations, so two runs of one precision
    already differ. Runs of two precisions that train alike are, on average, no further
    apart than two runs of the noisier precision; a systematic difference makes them
    further apart than that. So a precision is "within noise" when its mean gap to the
    float32 runs is at most the larger of the two within-precision mean gaps.
    `<p>_mean_difference` is the mean over logged steps of (its mean curve - float32's).
    """
    by_precision: dict[str, list[dict]] = {}
    for run in runs:
        by_precision.setdefault(run["precision"], []).append(run)
    float32 = by_precision["float32"]
    result = {}
    for tag in CURVES:
        noise = _pair_gaps(float32, None, tag)
        entry = {"float32_gap_mean": _mean(noise), "float32_gap_max": max(noise)}
        for precision, group in by_precision.items():
            if precision == "float32":
                continue
            own = _pair_gaps(group, None, tag) if len(group) > 1 else [0.0]
            cross = _mean(_pair_gaps(group, float32, tag))
            steps = sorted(set.intersection(*(set(r["curves"][tag]) for r in group + float32)))
            entry[f"{precision}_own_gap_mean"] = _mean(own)
            entry[f"{precision}_gap_mean"] = cross
            entry[f"{precision}_mean_difference"] = _mean([
                _mean([r["curves"][tag][s] for r in group]) - _mean([r["curves"][tag][s] for r in float32])
                for s in steps
            ])
            entry[f"{precision}_within_noise"] = cross <= max(_mean(noise), _mean(own))
        result[tag] = entry
    return result


def write_report(args: argparse.Namespace, runs: list[dict], comparison: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(args.output_dir)
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for axis, tag in zip(axes, CURVES):
        for run in runs:
            steps = sorted(run["curves"][tag])
            style = "-" if run["precision"] == "float32" else "--"
            axis.plot(steps, [run["curves"][tag][s] for s in steps], style,
                      label=f"{run['precision']} seed {run['seed']}")
        axis.set_title(tag)
        axis.set_xlabel("step")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "report.png", dpi=100)
    plt.close(figure)

    others = [p for p in args.precisions.split(",") if p != "float32"]
    lines = [
        "# Mixed precision vs float32: short pretraining runs",
        "",
        f"ResNet-{args.resnet_depth} x{args.width_multiplier:g}, {args.image_size} px, batch "
        f"{args.train_batch_size}, {args.steps} steps, LARS, no blur, linear eval while pretraining; "
        f"`{args.dataset}` `{args.train_split}`. {args.runs} runs per precision (own initialisation, "
        "augmentations and data order). A gap is the mean |difference| of two runs' curves over the "
        f"steps logged every {args.log_every_steps} (each logged value averages the steps since the last). "
        "Within noise: the mean gap to the float32 runs is at most the larger of the two precisions' own "
        "mean run-to-run gaps (a systematic difference would put the runs further apart). The last "
        "column is the mean over logged steps of the difference between the two mean curves.",
        "",
        "| curve | float32 vs float32: mean gap (max) | "
        + " | ".join(f"{p} vs {p} | {p} vs float32 | {p} - float32, mean" for p in others) + " |",
        "| --- | --- | " + " | ".join("--- | --- | ---" for _ in others) + " |",
    ]
    for tag, entry in comparison.items():
        cells = [f"{entry[f'{p}_own_gap_mean']:.4f} | {entry[f'{p}_gap_mean']:.4f} "
                 f"({'within' if entry[f'{p}_within_noise'] else 'OUTSIDE'} noise) | "
                 f"{entry[f'{p}_mean_difference']:+.4f}" for p in others]
        lines.append(f"| {tag} | {entry['float32_gap_mean']:.4f} ({entry['float32_gap_max']:.4f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "| run | final contrast_loss | final contrast_acc | seconds |", "| --- | --- | --- | --- |"]
    for run in runs:
        loss, acc = (run["curves"][t] for t in ("train/contrast_loss", "train/contrast_acc"))
        seconds = "reused" if run["seconds"] is None else f"{run['seconds']:.0f}"
        lines.append(f"| {run['precision']} seed {run['seed']} | {loss[max(loss)]:.4f} | {acc[max(acc)]:.4f} | {seconds} |")
    lines += ["", "![curves](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(
        {"config": vars(args), "comparison": comparison,
         "runs": [{**r, "curves": {t: {str(s): v for s, v in c.items()} for t, c in r["curves"].items()}}
                  for r in runs]},
        indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    runs = [train_run(args, precision, seed)
            for seed in range(args.runs) for precision in args.precisions.split(",")]
    comparison = compare(runs)
    write_report(args, runs, comparison)
    print(pathlib.Path(args.output_dir, "report.md").read_text())
    return comparison


if __name__ == "__main__":
    main()
