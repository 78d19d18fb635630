"""Self-learning under shift, measured: a trained classifier before and after `--train_mode=adapt`.

    python tools/adapt_report.py --checkpoint=runs/label_efficiency_semi/finetune_0.01 \
        --dataset=folder:../shared/datasets/cifar10 --split='train[90%:]' --severities=3 \
        --output_dir=runs/adapt_cifar10

For every corruption and severity: the images of `--split` corrupted
(`tools/corrupt_images.py`, written once under `<output_dir>/data/`), the classifier's
top-1 on them as it is (`--mode=eval`), then after adapting on them without labels
(`--train_mode=adapt`, `--adapt_epochs` passes) and evaluated on the same images, as
test-time adaptation is. Writes `report.md` (a table per corruption and severity),
`report.png` (a heat map of the change in top-1) and `report.json`. Finished runs are
reused, so an interrupted report continues. Carve `--split` from images the classifier did
not train on (its run's `--eval_split`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from simclr_tf.config import ADAPT_LOSSES, Config  # noqa: E402
from simclr_tf.data import corruptions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="The source classifier's model_dir (a run of ours).")
    parser.add_argument("--dataset", required=True, help="The clean source images (as run.py's --dataset).")
    parser.add_argument("--split", default="train[90%:]")
    parser.add_argument("--corruptions", default=",".join(corruptions.CORRUPTIONS))
    parser.add_argument("--severities", default="3")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--adapt_loss", choices=ADAPT_LOSSES, default="gce")
    parser.add_argument("--adapt_epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    # Adam at 1e-3 after linear batch scaling (TENT's CIFAR setting), on the batch norms only.
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Before scaling by batch / 256.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.corruptions = [c for c in args.corruptions.split(",") if c]
    args.severities = [int(s) for s in args.severities.split(",") if s]
    return args


def source_config(checkpoint: str) -> Config:
    """The source run's config (its config.json): the model to rebuild."""
    from simclr_tf.train.experiment import read_saved_config

    saved = read_saved_config(checkpoint)
    if not saved:
        raise SystemExit(f"--checkpoint: no config.json in {checkpoint!r}; pass the model_dir of a run of ours.")
    return Config.from_dict(saved)


def target_config(base: Config, target_root: str, args: argparse.Namespace, *, adapt: bool) -> Config:
    return base.replace(
        data={"dataset": f"folder:{target_root}", "train_split": "train", "eval_split": "train",
              "cache_dataset": True, "labeled_fraction": 1.0, "labeled_per_class": 0},
        model={"dropout_rate": 0.0, "stochastic_depth_rate": 0.0, "fine_tune_after_block": -1},
        optim={"optimizer": "adam", "learning_rate": args.learning_rate, "learning_rate_scaling": "linear",
               "warmup_epochs": 0, "weight_decay": 0.0},
        train={"train_mode": "adapt", "mode": "train_then_eval" if adapt else "eval",
               "checkpoint": args.checkpoint, "train_epochs": args.adapt_epochs, "train_steps": 0,
               "train_batch_size": args.batch_size, "checkpoint_steps": 0, "checkpoint_epochs": 1,
               "keep_hub_module_max": 0, "knn_eval": False, "linear_probe_eval": False, "seed": args.seed},
        adapt={"adapt_loss": args.adapt_loss},
    )


def adapt_report(args: argparse.Namespace) -> dict:
    from tools.corrupt_images import parse_args as corrupt_args, write_corrupted
    from tools.label_efficiency import run

    base = source_config(args.checkpoint)
    cells = {}
    for corruption in args.corruptions:
        for severity in args.severities:
            name = f"{corruption}_{severity}"
            data_root = os.path.join(args.output_dir, "data")
            target_root = os.path.join(data_root, name)
            if not os.path.isdir(os.path.join(target_root, "train")):
                write_corrupted(corrupt_args([
                    f"--dataset={args.dataset}", f"--split={args.split}", f"--corruptions={corruption}",
                    f"--severities={severity}", f"--seed={args.seed}", f"--output_dir={data_root}"]))
            before = run(target_config(base, target_root, args, adapt=False), os.path.join(args.output_dir, name, "unadapted"))
            after = run(target_config(base, target_root, args, adapt=True), os.path.join(args.output_dir, name, "adapted"))
            cells[name] = {
                "corruption": corruption, "severity": severity,
                "unadapted": before["eval/label_top_1_accuracy"], "adapted": after["eval/label_top_1_accuracy"],
                "adapt_seconds": after["seconds"],
            }
    report = {"checkpoint": args.checkpoint, "split": args.split, "adapt_loss": args.adapt_loss,
              "adapt_epochs": args.adapt_epochs, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate, "cells": cells}
    write_report(report, args)
    return report


def write_report(report: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = report["cells"]
    lines = [
        "# Self-learning under shift",
        "",
        f"Top-1 (%) of `{report['checkpoint']}` on `{report['split']}` corrupted, before and after "
        f"`--train_mode=adapt` ({report['adapt_loss']}, batch-norm scales and offsets only, "
        f"{report['adapt_epochs']} epochs at batch {report['batch_size']}, Adam, learning rate "
        f"{report['learning_rate']:g} x batch / 256), evaluated on the same images.",
        "",
        "| corruption | severity | unadapted | adapted | change | adapt min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell in cells.values():
        lines.append(f"| {cell['corruption']} | {cell['severity']} | {100 * cell['unadapted']:.1f} | "
                     f"{100 * cell['adapted']:.1f} | {100 * (cell['adapted'] - cell['unadapted']):+.1f} | "
                     f"{cell['adapt_seconds'] / 60:.1f} |")
    for severity in args.severities:
        row = [c for c in cells.values() if c["severity"] == severity]
        before = np.mean([c["unadapted"] for c in row])
        after = np.mean([c["adapted"] for c in row])
        lines.append(f"| mean | {severity} | {100 * before:.1f} | {100 * after:.1f} | {100 * (after - before):+.1f} | |")
    lines += ["", "![change in top-1 per corruption and severity](report.png)", ""]
    pathlib.Path(args.output_dir, "report.md").write_text("\n".join(lines))
    pathlib.Path(args.output_dir, "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))

    change = np.full((len(args.corruptions), len(args.severities)), np.nan)
    for i, corruption in enumerate(args.corruptions):
        for j, severity in enumerate(args.severities):
            cell = cells[f"{corruption}_{severity}"]
            change[i, j] = 100 * (cell["adapted"] - cell["unadapted"])
    limit = max(1.0, float(np.nanmax(np.abs(change))))
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(args.severities), 0.8 + 0.5 * len(args.corruptions)), dpi=120)
    image = axes.imshow(change, cmap="RdBu", vmin=-limit, vmax=limit)
    for (i, j), value in np.ndenumerate(change):
        axes.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(args.severities)), [str(s) for s in args.severities])
    axes.set_yticks(range(len(args.corruptions)), args.corruptions)
    axes.set_xlabel("severity")
    figure.colorbar(image, ax=axes, label="top-1 change (points)")
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "report.png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    from absl import logging

    logging.set_verbosity(logging.INFO)
    args = parse_args(argv)
    adapt_report(args)
    print(pathlib.Path(args.output_dir, "report.md").read_text())


if __name__ == "__main__":
    main()
