"""Label-efficiency report: the SimCLRv2 claim, measured on your data.

For each label fraction (default 1% and 10%), on one train/validation split:
  (a) supervised: a network trained from scratch on the labeled subset only;
  (b) pretrain + finetune: SimCLR pretraining on all training images without labels,
      then fine-tuning from the first projection layer on the labeled subset;
  (c) distill: (b) as the teacher, its soft labels on all training images (plus the
      labeled subset, weight 0.3) train a student of the same architecture started
      from the teacher's weights (self-distillation).
With --methods (e.g. `fixmatch,uda` or `all`), each semi-supervised train mode adds two
rows, on the same split, labeled subset, model and augmentation flags:
  <method> (scratch): the method from random weights;
  <method> (from SimCLRv2): the method started from (b)'s fine-tuned model.
It writes `report.md` (a Markdown table of validation top-1 and wall time per run),
`report.png` (top-1 vs label fraction, one line per row) and `report.json` into
--output_dir.

Every run lives in its own sub-directory and is skipped when its result.json already
exists, so an interrupted report continues where it stopped.

Command (about an hour on 2 CPU cores):
  python tools/label_efficiency.py --dataset=folder:../shared/datasets/cifar10 \
    --train_split='train[:90%]' --eval_split='train[90%:]' --budget=hour \
    --output_dir=runs/label_efficiency
On accelerators, scale the runs up with --budget=full or the per-stage flags
(--pretrain_epochs, --resnet_depth, --width_multiplier, --batch_size, ...).
Adding --methods=all --fractions=0.01 adds two runs a method (one for semivit, which only
fine-tunes (b)'s model), 15 runs of at most 20 minutes each (hour budget).
--student_resnet_depth=D (and/or --student_width_multiplier=W) adds big-to-small
distillation: (b) teaches a smaller student from random weights on all training images,
once with the teacher on the un-augmented image ("fixed teacher") and once with both on
the same crop mixed up (Beyer et al.'s "function matching"), for the same epochs.
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
# The two starts of every semi-supervised method: row key suffix -> title suffix.
STARTS = {"scratch": "(scratch)", "simclr": "(from SimCLRv2)"}


def starts_of(method: str) -> dict[str, str]:
    """The method's starts: a method that fine-tunes a classifier (semivit) has no scratch row."""
    from simclr_tf.config import SEMI_SUPERVISED_FROM_CHECKPOINT_MODES

    return {k: v for k, v in STARTS.items() if not (k == "scratch" and method in SEMI_SUPERVISED_FROM_CHECKPOINT_MODES)}


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
    # Semi-supervised runs: labeled images per step (each step also reads
    # --unlabeled_batch_ratio (7) times as many unlabeled ones per unlabeled view), and
    # images through the network per run, the same for every method: steps are
    # method_images / images_per_step (a FixMatch step at batch 32: 32 + 2 x 224 = 480).
    method_batch_size: int
    method_images: int
    # Big-to-small distillation (--student_resnet_depth / --student_width_multiplier): epochs of each student.
    student_distill_epochs: int


BUDGETS = {
    # Seconds, for tests.
    "smoke": Budget(10, 0.25, 32, 1, 4, 1, method_batch_size=4, method_images=120, student_distill_epochs=1),
    # method_images: <= 20 minutes a run on 2 CPU cores at up to ~2.6 ms an image, plus
    # ~1 min of start-up and evaluation: 833 FixMatch steps, 391 of S4L. A FixMatch step
    # here took 1.2-1.9 s (2.6-4 ms an image) with other jobs on the cores; pretraining
    # in docs/label_efficiency_cifar10 took 1.6 ms an image. On a busier machine, lower it.
    # student_distill_epochs: ~15 minutes for a ResNet-10 x0.25 student of the ResNet-18 x0.25
    # teacher, about (c)'s time; at 4 epochs the consistent student ended 5.6 points below it.
    "hour": Budget(18, 0.25, 256, 15, 400, 2, method_batch_size=32, method_images=400_000,
                   student_distill_epochs=16),
    # A GPU/TPU run of the original CIFAR-10 setting; the methods at FixMatch's batch (64),
    # 50k FixMatch steps.
    # Function matching wants long schedules (Beyer et al.: thousands of epochs on small sets).
    "full": Budget(18, 1.0, 512, 800, 5000, 100, method_batch_size=64, method_images=48_000_000,
                   student_distill_epochs=1000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="folder:../shared/datasets/cifar10")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--train_split", default="train[:90%]")
    parser.add_argument("--eval_split", default="train[90%:]")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--backbone", choices=("resnet", "vit"), default="resnet",
                        help="vit: every run on a ViT (--vit_size, --patch_size) with AdamW (VIT_OPTIMIZER).")
    parser.add_argument("--vit_size", default="tiny", help="With --backbone=vit: tiny, small or base.")
    parser.add_argument("--patch_size", type=int, default=4, help="With --backbone=vit (4 for 32 px).")
    parser.add_argument("--fractions", default="0.01,0.1", help="Comma-separated label fractions.")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="hour")
    parser.add_argument("--output_dir", default="runs/label_efficiency")
    parser.add_argument("--labeled_seed", type=int, default=0)
    parser.add_argument("--methods", default="",
                        help="Comma-separated semi-supervised train modes to add (fixmatch, uda, mean_teacher, "
                             "debiasmatch, dst, s4l, mpl, semivit), or 'all'; default: none.")
    parser.add_argument("--unlabeled_batch_ratio", type=int, default=7,
                        help="Unlabeled images per labeled one and view in every semi-supervised run "
                             "(FixMatch's 7 for all, so the rows differ only by method).")
    parser.add_argument("--student_resnet_depth", type=int, default=None,
                        help="Adds two big-to-small distillation rows: (b) teaches a student of this depth "
                             "(e.g. 10 under a ResNet-18 teacher), fixed teacher view vs consistent views + mixup.")
    parser.add_argument("--student_width_multiplier", type=float, default=None,
                        help="The big-to-small student's width (default: the budget's); also adds the rows.")
    # Learning rates after batch scaling, i.e. at any --method_batch_size: those of rows (a) and (b).
    parser.add_argument("--method_lr_scratch", type=float, default=None,
                        help="Learning rate of the semi-supervised runs from scratch (default: row (a)'s, "
                             "0.1 for a ResNet).")
    parser.add_argument("--method_lr_simclr", type=float, default=None,
                        help="Learning rate of the semi-supervised runs from the fine-tuned SimCLRv2 model "
                             "(default: row (b)'s, 0.003 for a ResNet).")
    for field in dataclasses.fields(Budget):
        # Annotations are strings here (postponed evaluation).
        parser.add_argument(f"--{field.name}", type={"int": int, "float": float}[field.type],
                            default=None, help=f"Override the budget's {field.name}.")
    parser.add_argument("--use_tpu", action="store_true")
    parser.add_argument("--tpu_name", default=None)
    args = parser.parse_args(argv)
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as error:
        parser.error(str(error))
    if args.backbone == "vit" and (args.student_resnet_depth or args.student_width_multiplier):
        parser.error("--student_resnet_depth / --student_width_multiplier: the big-to-small rows are ResNet "
                     "students; drop them with --backbone=vit.")
    starts = {"scratch": "scratch", "simclr": "pretrained"}
    for start, role in starts.items():
        if getattr(args, f"method_lr_{start}") is None:
            setattr(args, f"method_lr_{start}", LEARNING_RATES[args.backbone][role])
    return args


def parse_methods(text: str) -> list[str]:
    """The --methods list: names from SEMI_SUPERVISED_MODES, or 'all'."""
    from simclr_tf.config import SEMI_SUPERVISED_MODES

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(SEMI_SUPERVISED_MODES)
    unknown = [name for name in names if name not in SEMI_SUPERVISED_MODES]
    if unknown:
        raise ValueError(
            f"--methods: unknown {', '.join(unknown)}; use 'all' or a comma-separated list of "
            f"{', '.join(SEMI_SUPERVISED_MODES)}."
        )
    return list(dict.fromkeys(names))


# Big-to-small distillation rows: key -> (--distill_views, --mixup_alpha, title).
# Mixup's lambda ~ Beta(1, 1), big_vision's distillation configs (mixup p=1.0).
STUDENT_ROWS = {
    "student_fixed": ("fixed", 0.0, "fixed teacher view"),
    "student_consistent": ("consistent", 1.0, "consistent views + mixup"),
}


def row_titles(methods: list[str], student: tuple[int, float] | None = None) -> dict[str, str]:
    """Report rows in table order: key -> title; `student`: the big-to-small (depth, width)."""
    rows = dict(METHODS)
    if student is not None:
        for key, (_, _, views) in STUDENT_ROWS.items():
            rows[key] = f"(c') (b) distilled into ResNet-{student[0]} x{student[1]:g}, {views}"
    for method in methods:
        for start, title in starts_of(method).items():
            rows[f"{method}_{start}"] = f"{method} {title}"
    return rows


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
            # A ResNet run's config keeps the ViT fields' defaults (as every run made before them).
            **({"backbone": "vit", "vit_size": args.vit_size, "patch_size": args.patch_size}
               if args.backbone == "vit" else {}),
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
        # One mu for every method (FixMatch's 7 by default), so the rows differ only by
        # method; the image budget keeps their cost equal (S4L's own recipe would use 1).
        semi={"unlabeled_batch_ratio": args.unlabeled_batch_ratio},
        runtime={"use_tpu": args.use_tpu, "tpu_name": args.tpu_name},
    )


# Learning rates per backbone and start (after batch scaling): a ResNet's are those that did
# best on CIFAR-10 1% (momentum SGD, tried 0.003-0.1; LARS 1.0 to pretrain); a ViT's are
# AdamW's usual ones (DeiT, MoCo v3), not tuned here.
LEARNING_RATES = {
    "resnet": {"pretrain": 1.0, "scratch": 0.1, "pretrained": 0.003},
    "vit": {"pretrain": 1e-3, "scratch": 1e-3, "pretrained": 1e-4},
}
# A ViT trains with AdamW and DeiT's decoupled weight decay everywhere (LARS and momentum SGD
# suit it poorly); its embeddings and norms are not decayed (simclr_tf/optim/factory.py).
VIT_OPTIMIZER = {"optimizer": "adamw", "weight_decay": 0.05}


def optimizer(base, start: str, resnet: dict) -> dict:
    """The optim section of a run: `resnet` (with its rate for `start`) on a ResNet, AdamW on a ViT."""
    backbone = base.model.backbone
    rate = {"learning_rate": LEARNING_RATES[backbone][start]}
    return {**resnet, **rate} if backbone == "resnet" else {**resnet, **VIT_OPTIMIZER, **rate}


def pretrain_config(base, budget: Budget):
    # No labels at all: the linear head is off, so the representation never sees one.
    return base.replace(
        train={"train_mode": "pretrain", "train_epochs": budget.pretrain_epochs,
               "lineareval_while_pretraining": False},
        optim=optimizer(base, "pretrain", {"optimizer": "lars", "warmup_epochs": 1}),
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
        optim=optimizer(base, "pretrained" if finetuning else "scratch",
                        {"optimizer": "momentum", "warmup_epochs": 0, "weight_decay": 1e-4}),
    )


def distill_config(base, budget: Budget, fraction: float, teacher: str):
    """Self-distillation: the student starts from the teacher and learns its soft labels on all images."""
    return base.replace(
        train={"train_mode": "distill", "train_epochs": budget.distill_epochs, "checkpoint": teacher},
        data={"labeled_fraction": fraction},
        model={"ft_proj_selector": 1},
        distill={"teacher_checkpoint": teacher, "distill_temperature": 1.0, "distill_label_weight": 0.3},
        optim=optimizer(base, "pretrained", {"optimizer": "momentum", "warmup_epochs": 0, "weight_decay": 1e-5}),
    )


def student_architecture(args: argparse.Namespace, budget: Budget) -> tuple[int, float] | None:
    """The big-to-small student's (depth, width), or None when no student row is asked for."""
    if args.student_resnet_depth is None and args.student_width_multiplier is None:
        return None
    return (args.student_resnet_depth or budget.resnet_depth, args.student_width_multiplier or budget.width_multiplier)


def student_distill_config(base, budget: Budget, fraction: float, teacher: str, student: tuple[int, float],
                           row: str):
    """Big-to-small: a smaller student from random weights learns (b)'s soft labels only.

    Both rows differ only in what the teacher sees (Beyer et al.'s fixed teacher vs function
    matching); the student's optimizer is row (a)'s, as it also starts from random weights.
    """
    views, mixup_alpha, _ = STUDENT_ROWS[row]
    return base.replace(
        train={"train_mode": "distill", "train_epochs": budget.student_distill_epochs, "checkpoint": None},
        data={"labeled_fraction": fraction},
        model={"resnet_depth": student[0], "width_multiplier": student[1], "ft_proj_selector": 0},
        distill={"teacher_checkpoint": teacher, "distill_temperature": 1.0, "distill_label_weight": 0.0,
                 "distill_views": views, "mixup_alpha": mixup_alpha},
        optim=optimizer(base, "scratch", {"optimizer": "momentum", "warmup_epochs": 0, "weight_decay": 1e-4}),
    )


def images_per_step(train_mode: str, batch_size: int, unlabeled_batch_ratio: int) -> int:
    """Images a step of `train_mode` passes through the network (Mean Teacher's teacher pass counted in full)."""
    from simclr_tf.methods import s4l
    from simclr_tf.methods.registry import METHODS as TRAIN_MODES

    views = len(TRAIN_MODES[train_mode].unlabeled_views)
    images = batch_size * (1 + views * unlabeled_batch_ratio)
    # S4L classifies every image in each of its rotations.
    return images * s4l.NUM_ROTATIONS if train_mode == "s4l" else images


def method_steps(budget: Budget, train_mode: str, unlabeled_batch_ratio: int) -> int:
    return max(1, round(budget.method_images / images_per_step(train_mode, budget.method_batch_size,
                                                                unlabeled_batch_ratio)))


def method_config(base, budget: Budget, fraction: float, train_mode: str, checkpoint: str | None,
                  learning_rate: float):
    """A semi-supervised run on the subset, from scratch or from (b)'s fine-tuned model.

    `learning_rate` is the rate the optimizer uses; --learning_rate_scaling=linear
    multiplies the base by batch / 256, so the base is set to undo that. The defaults are
    rows (a)'s and (b)'s: a larger rate washes out what fine-tuning learned.
    """
    from_simclr = checkpoint is not None
    steps = method_steps(budget, train_mode, base.semi.unlabeled_batch_ratio)
    return base.replace(
        train={
            "train_mode": train_mode,
            "train_steps": steps,
            "train_batch_size": budget.method_batch_size,
            "checkpoint": checkpoint,
            # Resumable within a run too: a stage may take 20 minutes.
            "checkpoint_steps": min(steps, 200),
            # The row is the classifier's top-1; a probe on features of the whole train
            # split would spend a minute of the run's budget on CIFAR-10.
            "linear_probe_eval": False,
        },
        data={"labeled_fraction": fraction},
        # The fine-tuned model keeps the first projection layer: build the same model.
        model={"ft_proj_selector": 1 if from_simclr else 0},
        optim={
            **optimizer(base, "scratch", {"optimizer": "momentum", "warmup_epochs": 0, "weight_decay": 1e-4}),
            "learning_rate": learning_rate * 256 / budget.method_batch_size,
            "learning_rate_scaling": "linear",
        },
        # Evaluation uses the weight average: it should span the last ~10% of the steps,
        # not (at 0.999 over 1,000 steps) keep a third of the random start.
        semi={"ema_decay": min(0.999, max(0.0, 1.0 - 10.0 / steps))},
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
    student = student_architecture(args, budget)
    rows = row_titles(args.methods, student)
    results: dict[str, dict[str, float]] = {row: {} for row in rows}
    run_seconds = {"pretrain": pretrain["seconds"]}
    for fraction in fractions:
        tag = f"{fraction:g}"
        supervised = run(labeled_config(base, budget, fraction, "supervised", None),
                         os.path.join(out, f"supervised_{tag}"))
        finetune_dir = os.path.join(out, f"finetune_{tag}")
        finetune = run(labeled_config(base, budget, fraction, "finetune", pretrain_dir), finetune_dir)
        distill = run(distill_config(base, budget, fraction, finetune_dir), os.path.join(out, f"distill_{tag}"))
        row_results = {"supervised": supervised, "finetune": finetune, "distill": distill}
        for row in STUDENT_ROWS if student is not None else ():
            config = student_distill_config(base, budget, fraction, finetune_dir, student, row)
            row_results[row] = run(config, os.path.join(out, f"{row}_{tag}"))
        for method in args.methods:
            for start, checkpoint, learning_rate in (("scratch", None, args.method_lr_scratch),
                                                     ("simclr", finetune_dir, args.method_lr_simclr)):
                if start not in starts_of(method):
                    continue
                config = method_config(base, budget, fraction, method, checkpoint, learning_rate)
                row_results[f"{method}_{start}"] = run(config, os.path.join(out, f"{method}_{start}_{tag}"))
        for row, result in row_results.items():
            results[row][tag] = result["eval/label_top_1_accuracy"]
            run_seconds[f"{row}_{tag}"] = result["seconds"]

    report = {
        "model": model_name(args.backbone, budget, args.vit_size, args.patch_size),
        "budget": dataclasses.asdict(budget),
        "dataset": args.dataset,
        "train_split": args.train_split,
        "eval_split": args.eval_split,
        "rows": rows,
        "method_steps": {m: method_steps(budget, m, base.semi.unlabeled_batch_ratio) for m in args.methods},
        "unlabeled_batch_ratio": base.semi.unlabeled_batch_ratio,
        "student": list(student) if student else None,
        "method_lr": {"scratch": args.method_lr_scratch, "simclr": args.method_lr_simclr},
        "top_1": results,
        # Representation quality without labels (weighted k-NN on frozen features).
        "pretrain_knn_top_1": pretrain["eval/knn_top_1_accuracy"],
        "run_seconds": run_seconds,
        "seconds": sum(run_seconds.values()),
    }
    write_report(report, fractions, out)
    return report


def markdown_table(report: dict, fractions: list[float]) -> str:
    """Top-1 (%) and the run's wall time (minutes) per row and label fraction."""
    tags = [f"{f:g}" for f in fractions]
    header = "| method | " + " | ".join(f"{float(t):.0%} labels | min" for t in tags) + " |"
    lines = [header, "|" + " --- |" * (2 * len(tags) + 1)]
    for row, title in report.get("rows", METHODS).items():
        cells = [f"{100 * report['top_1'][row][t]:.1f} | {report['run_seconds'][f'{row}_{t}'] / 60:.1f}"
                 for t in tags]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_name(backbone: str, budget, vit_size: str = "tiny", patch_size: int = 4) -> str:
    """The network of every row but the big-to-small students, as the report names it."""
    if backbone == "vit":
        return f"ViT-{vit_size.capitalize()}/{patch_size}"
    budget = budget if isinstance(budget, dict) else dataclasses.asdict(budget)
    return f"ResNet-{budget['resnet_depth']} x{budget['width_multiplier']:g}"


def write_report(report: dict, fractions: list[float], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    budget = report["budget"]
    text = [
        "# Label efficiency",
        "",
        f"Validation top-1 (%) on `{report['eval_split']}` of `{report['dataset']}`; "
        f"{report.get('model') or model_name('resnet', budget)}, "
        f"{budget['pretrain_epochs']} pretraining epochs, {budget['label_steps']} label steps, "
        f"{budget['distill_epochs']} distillation epochs; {report['seconds'] / 60:.0f} min in all "
        f"(pretraining: {report['run_seconds']['pretrain'] / 60:.0f} min).",
        *method_summary(report),
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

    rows = report.get("rows", METHODS)
    tags = [f"{f:g}" for f in fractions]
    if len(fractions) == 1:
        # One fraction makes every line a single point: bars read better.
        figure = _bar_plot(plt, report, rows, tags[0])
        figure.savefig(os.path.join(out, "report.png"), bbox_inches="tight")
        plt.close(figure)
        return
    figure, axes = plt.subplots(figsize=(5 if len(rows) <= 3 else 7.5, 3.5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    fixed_rows = [row for row in rows if row in METHODS or row in STUDENT_ROWS]
    methods = list(dict.fromkeys(row.rsplit("_", 1)[0] for row in rows if row not in fixed_rows))
    for row, title in rows.items():
        if row in fixed_rows:
            style = {"color": colors[fixed_rows.index(row)], "marker": "o" if row in METHODS else "D"}
        else:  # a method's two starts share its colour: dotted from scratch, solid from SimCLRv2
            method, start = row.rsplit("_", 1)
            style = {"color": colors[(len(fixed_rows) + methods.index(method)) % len(colors)],
                     "marker": "s" if start == "scratch" else "^",
                     "linestyle": ":" if start == "scratch" else "-"}
        axes.plot([100 * f for f in fractions], [100 * report["top_1"][row][t] for t in tags],
                  label=title, **style)
    axes.set_xscale("log")
    axes.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the fractions' labels
    axes.set_xlabel("labeled fraction of the training split")
    axes.set_ylabel("validation top-1 (%)")
    axes.grid(alpha=0.3)
    if len(rows) <= 3:
        axes.legend(fontsize=7)
    else:
        axes.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(os.path.join(out, "report.png"), bbox_inches="tight")  # the legend may sit outside
    plt.close(figure)


def _bar_plot(plt, report: dict, rows: dict[str, str], tag: str):
    """Top-1 per row at one label fraction, in table order: rows (a)-(c') grey, a method's
    run from scratch light and from SimCLRv2 dark; dashed lines at (a) and (b)."""
    titles = list(rows.values())
    values = [100 * report["top_1"][row][tag] for row in rows]
    colors = ["#8c8c8c" if row in METHODS or row in STUDENT_ROWS
              else "#9ecae1" if row.endswith("_scratch") else "#2171b5" for row in rows]
    figure, axes = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2), dpi=120)
    positions = range(len(rows))
    axes.barh(positions, values, color=colors)
    for position, value in zip(positions, values):
        axes.text(value + 0.3, position, f"{value:.1f}", va="center", fontsize=7)
    for row, style in (("supervised", ":"), ("finetune", "--")):
        axes.axvline(100 * report["top_1"][row][tag], color="black", linestyle=style, linewidth=0.8)
    axes.set_yticks(list(positions), titles, fontsize=7)
    axes.invert_yaxis()  # the table's order, top to bottom
    axes.set_xlim(0, max(values) + 6)
    axes.set_xlabel(f"validation top-1 (%), {float(tag):.0%} labels (dotted: (a), dashed: (b))")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def method_summary(report: dict) -> list[str]:
    """The semi-supervised and big-to-small runs' settings, when there are any."""
    budget = report["budget"]
    lines = []
    if report.get("student"):
        depth, width = report["student"]
        lines += ["", f"Big-to-small rows (c'): (b) teaches a ResNet-{depth} x{width:g} student from "
                      f"random weights on all training "
                      f"images for {budget['student_distill_epochs']} epochs, soft labels only."]
    if not report.get("method_steps"):
        return lines
    return lines + [
        "",
        f"Semi-supervised rows: {budget['method_images']:,} images through the network per run "
        f"({', '.join(f'{m}: {n} steps' for m, n in report['method_steps'].items())}), "
        f"{budget['method_batch_size']} labeled images and {report['unlabeled_batch_ratio']} times as many "
        f"unlabeled ones per view and step; learning rate "
        f"{report['method_lr']['scratch']:g} from scratch, {report['method_lr']['simclr']:g} from (b)'s "
        f"fine-tuned model; evaluated with the weight average.",
    ]


def main(argv: list[str] | None = None) -> None:
    from absl import logging

    logging.set_verbosity(logging.INFO)
    args = parse_args(argv)
    report = label_efficiency(args)
    print(markdown_table(report, [float(f) for f in args.fractions.split(",")]))


if __name__ == "__main__":
    main()
