"""Label-efficiency report: the SimCLRv2 claim, measured on your data.

For each label fraction (default 1% and 10%), on one train/validation split:
  (a) supervised: a network trained from scratch on the labeled subset only;
  (b) pretrain + finetune: SimCLR pretraining on all training images without labels,
      then fine-tuning from the first projection layer on the labeled subset;
  (c) distill: (b) as the teacher, its soft labels on all training images (plus the
      labeled subset, weight 0.3) train a student of the same architecture started
      from the teacher's weights (self-distillation).
It writes `report.md` (a Markdown table of validation top-1), `report.png` (top-1 vs
label fraction, one line per method) and `report.json` into --output_dir.

Every run lives in its own sub-directory and is skipped when its result.json already
exists, so an interrupted report continues where it stopped.

Command (about an hour on 2 CPU cores):
  python tools/label_efficiency.py --dataset=folder:../shared/datasets/cifar10 \
    --train_split='train[:90%]' --eval_split='train[90%:]' --budget=hour \
    --output_dir=runs/label_efficiency
On accelerators, scale the runs up with --budget=full or the per-stage flags
(--pretrain_epochs, --resnet_depth, --width_multiplier, --batch_size, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = {
    "supervised": "(a) supervised on the labeled subset",
    "finetune": "(b) pretrain on all images + finetune",
    "distill": "(c) (b) distilled on all images",
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of the runs; `hour` fits the whole report in about an hour on 2 CPU cores."""

    resnet_depth: int
    width_multiplier: float
    batch_size: int
    pretrain_epochs: int
    # Few labels give few images per epoch: label runs are sized in optimizer steps.
    label_steps: int
    distill_epochs: int


BUDGETS = {
    # Seconds, for tests.
    "smoke": Budget(18, 0.25, 32, 1, 4, 1),
    "hour": Budget(18, 0.25, 256, 15, 400, 2),
    # A GPU/TPU run of the original CIFAR-10 setting.
    "full": Budget(18, 1.0, 512, 800, 5000, 100),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="folder:../shared/datasets/cifar10")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--train_split", default="train[:90%]")
    parser.add_argument("--eval_split", default="train[90%:]")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--fractions", default="0.01,0.1", help="Comma-separated label fractions.")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="hour")
    parser.add_argument("--output_dir", default="runs/label_efficiency")
    parser.add_argument("--labeled_seed", type=int, default=0)
    for field in dataclasses.fields(Budget):
        # Annotations are strings here (postponed evaluation).
        parser.add_argument(f"--{field.name}", type={"int": int, "float": float}[field.type],
                            default=None, help=f"Override the budget's {field.name}.")
    parser.add_argument("--use_tpu", action="store_true")
    parser.add_argument("--tpu_name", default=None)
    return parser.parse_args(argv)


def resolve_budget(args: argparse.Namespace) -> Budget:
    base = BUDGETS[args.budget]
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Budget) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(base, **overrides)


def base_config(args: argparse.Namespace, budget: Budget):
    from simclr_tf.config import Config

    return Config.demo().replace(
        model={
            "resnet_depth": budget.resnet_depth,
            "width_multiplier": budget.width_multiplier,
            "image_size": args.image_size,
        },
        data={
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "train_split": args.train_split,
            "eval_split": args.eval_split,
            "labeled_seed": args.labeled_seed,
        },
        train={
            "mode": "train_then_eval",
            "train_batch_size": budget.batch_size,
            "eval_batch_size": 500,
            "knn_eval": False,
            "log_every_steps": 50,
            "keep_hub_module_max": 0,  # a study: no SavedModel exports
        },
        runtime={"use_tpu": args.use_tpu, "tpu_name": args.tpu_name},
    )


def pretrain_config(base, budget: Budget):
    # No labels at all: the linear head is off, so the representation never sees one.
    return base.replace(
        train={"train_mode": "pretrain", "train_epochs": budget.pretrain_epochs,
               "lineareval_while_pretraining": False},
        optim={"optimizer": "lars", "learning_rate": 1.0, "warmup_epochs": 1},
    )


def labeled_config(base, budget: Budget, fraction: float, train_mode: str, checkpoint: str | None):
    """Supervised (from scratch) or finetune (from the pretrained checkpoint) on the subset.

    Each gets the learning rate that did best for it on CIFAR-10 1% (momentum SGD,
    tried 0.003-0.1): from scratch 0.1, fine-tuning 0.003 (larger rates wash out the
    pretrained features on so few labels).
    """
    finetuning = train_mode == "finetune"
    return base.replace(
        train={
            "train_mode": train_mode,
            "train_steps": budget.label_steps,
            "checkpoint": checkpoint,
            # An epoch of 1% of CIFAR-10 is 2 steps: checkpoint by steps instead.
            "checkpoint_steps": budget.label_steps,
        },
        data={"labeled_fraction": fraction},
        # The paper fine-tunes from the first layer of the projection head.
        model={"ft_proj_selector": 1 if finetuning else 0},
        optim={
            "optimizer": "momentum",
            "learning_rate": 0.003 if finetuning else 0.1,
            "warmup_epochs": 0,
            "weight_decay": 1e-4,
        },
    )


def distill_config(base, budget: Budget, fraction: float, teacher: str):
    """Self-distillation: the student starts from the teacher and learns its soft labels on all images."""
    return base.replace(
        train={"train_mode": "distill", "train_epochs": budget.distill_epochs, "checkpoint": teacher},
        data={"labeled_fraction": fraction},
        model={"ft_proj_selector": 1},
        distill={"teacher_checkpoint": teacher, "distill_temperature": 1.0, "distill_label_weight": 0.3},
        optim={"optimizer": "momentum", "learning_rate": 0.003, "warmup_epochs": 0, "weight_decay": 1e-5},
    )


def run(config, model_dir: str) -> dict:
    """Trains and evaluates unless model_dir already holds this run's result."""
    from simclr_tf.train import train_and_evaluate

    done_path = os.path.join(model_dir, "label_efficiency_run.json")
    if os.path.exists(done_path):
        print(f"[label_efficiency] reusing {done_path}", flush=True)
        return json.loads(pathlib.Path(done_path).read_text())
    start = time.perf_counter()
    result = dict(train_and_evaluate(config, model_dir))
    result["seconds"] = time.perf_counter() - start
    pathlib.Path(done_path).write_text(json.dumps(result, indent=2, sort_keys=True))
    top_1 = {k: v for k, v in result.items() if k.endswith("top_1_accuracy")}
    print(f"[label_efficiency] {model_dir}: {top_1} in {result['seconds']:.0f} s", flush=True)
    return result


def label_efficiency(args: argparse.Namespace) -> dict:
    budget = resolve_budget(args)
    fractions = [float(f) for f in args.fractions.split(",")]
    base = base_config(args, budget)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)

    pretrain_dir = os.path.join(out, "pretrain")
    pretrain = run(pretrain_config(base, budget), pretrain_dir)
    results: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    run_seconds = {"pretrain": pretrain["seconds"]}
    for fraction in fractions:
        tag = f"{fraction:g}"
        supervised = run(labeled_config(base, budget, fraction, "supervised", None),
                         os.path.join(out, f"supervised_{tag}"))
        finetune_dir = os.path.join(out, f"finetune_{tag}")
        finetune = run(labeled_config(base, budget, fraction, "finetune", pretrain_dir), finetune_dir)
        distill = run(distill_config(base, budget, fraction, finetune_dir), os.path.join(out, f"distill_{tag}"))
        for method, result in (("supervised", supervised), ("finetune", finetune), ("distill", distill)):
            results[method][tag] = result["eval/label_top_1_accuracy"]
            run_seconds[f"{method}_{tag}"] = result["seconds"]

    report = {
        "budget": dataclasses.asdict(budget),
        "dataset": args.dataset,
        "train_split": args.train_split,
        "eval_split": args.eval_split,
        "top_1": results,
        # Representation quality without labels (weighted k-NN on frozen features).
        "pretrain_knn_top_1": pretrain["eval/knn_top_1_accuracy"],
        "run_seconds": run_seconds,
        "seconds": sum(run_seconds.values()),
    }
    write_report(report, fractions, out)
    return report


def markdown_table(report: dict, fractions: list[float]) -> str:
    tags = [f"{f:g}" for f in fractions]
    header = "| method | " + " | ".join(f"{float(t):.0%} labels" for t in tags) + " |"
    lines = [header, "|" + " --- |" * (len(tags) + 1)]
    for method, title in METHODS.items():
        row = report["top_1"][method]
        lines.append(f"| {title} | " + " | ".join(f"{100 * row[t]:.1f}" for t in tags) + " |")
    return "\n".join(lines)


def write_report(report: dict, fractions: list[float], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = report["budget"]
    text = [
        "# Label efficiency",
        "",
        f"Validation top-1 (%) on `{report['eval_split']}` of `{report['dataset']}`; "
        f"ResNet-{budget['resnet_depth']} x{budget['width_multiplier']:g}, "
        f"{budget['pretrain_epochs']} pretraining epochs, {budget['label_steps']} label steps, "
        f"{budget['distill_epochs']} distillation epochs; {report['seconds'] / 60:.0f} min in all.",
        "",
        markdown_table(report, fractions),
        "",
        f"k-NN top-1 of the pretrained features (no labels used in training): "
        f"{100 * report['pretrain_knn_top_1']:.1f}.",
        "",
        "![top-1 vs label fraction](report.png)",
        "",
    ]
    pathlib.Path(out, "report.md").write_text("\n".join(text))
    pathlib.Path(out, "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))

    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    tags = [f"{f:g}" for f in fractions]
    for method, title in METHODS.items():
        axes.plot([100 * f for f in fractions], [100 * report["top_1"][method][t] for t in tags],
                  marker="o", label=title)
    axes.set_xscale("log")
    axes.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axes.set_xlabel("labeled fraction of the training split")
    axes.set_ylabel("validation top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, "report.png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    from absl import logging

    logging.set_verbosity(logging.INFO)
    args = parse_args(argv)
    report = label_efficiency(args)
    print(markdown_table(report, [float(f) for f in args.fractions.split(",")]))


if __name__ == "__main__":
    main()
