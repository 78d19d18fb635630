"""Parameter counts of SimCLR models, and a check against the SimCLRv2 paper's table.

    python tools/model_summary.py --resnet_depth=152 --width_multiplier=3 --sk_ratio=0.0625
    python tools/model_summary.py --resnet_depth=18 --width_multiplier=0.5 --num_classes=10
    python tools/model_summary.py --paper_table   # exits 1 if any row differs
    python tools/model_summary.py --backbone=vit --vit_size=small --patch_size=16

Counts come from the real layers built with shape-only variables (nothing is
allocated), so every command takes a few seconds, mostly importing TensorFlow.
The paper's numbers count all backbone variables, BN moving statistics included;
the "trainable" column leaves those out.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from simclr_tf.models.simclr_model import PAPER_BACKBONE_PARAMS  # noqa: E402

SK = 0.0625  # the paper's selective-kernel ratio


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet", choices=["resnet", "vit"])
    parser.add_argument("--vit_size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--vit_pooling", default="token", choices=["token", "mean"])
    parser.add_argument("--resnet_depth", type=int, default=50)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--sk_ratio", type=float, default=0.0)
    parser.add_argument("--se_ratio", type=float, default=0.0)
    parser.add_argument("--image_size", type=int, default=224, help="<= 32 selects the CIFAR stem")
    parser.add_argument(
        "--proj_head_mode", default="nonlinear", choices=["none", "linear", "nonlinear"]
    )
    parser.add_argument("--proj_out_dim", type=int, default=128)
    parser.add_argument("--num_proj_layers", type=int, default=3)
    parser.add_argument("--ft_proj_selector", type=int, default=0)
    parser.add_argument("--num_classes", type=int, default=None, help="adds a supervised head")
    parser.add_argument("--paper_table", action="store_true", help="compare with the paper's table")
    return parser.parse_args(argv)


def _model_name(depth: int, width: float, sk_ratio: float, se_ratio: float = 0.0) -> str:
    name = f"R{depth} {width:g}x"
    if sk_ratio > 0:
        name += " SK" if sk_ratio == SK else f" SK{sk_ratio:g}"
    if se_ratio > 0:
        name += f" SE{se_ratio:g}"
    return name


def paper_table() -> int:
    """Prints the paper's table next to ours; returns the number of rows that differ."""
    from simclr_tf.models import count_parameters

    header = f"{'model':<14}{'paper (M)':>10}{'ours (M)':>10}{'ours (exact)':>14}{'trainable':>13}"
    print(header + "  ok")
    mismatches = 0
    for depth, width, sk_ratio, paper in PAPER_BACKBONE_PARAMS:
        counts = count_parameters(
            224, resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio
        )
        count, trainable = counts["all"]["backbone"], counts["trainable"]["backbone"]
        ok = round(count / 1e6) == paper
        mismatches += not ok
        print(
            f"{_model_name(depth, width, sk_ratio):<14}{paper:>10}{round(count / 1e6):>10}"
            f"{count:>14,}{trainable:>13,}  {'yes' if ok else 'NO'}"
        )
    return mismatches


def summary(args: argparse.Namespace) -> None:
    """Prints per-part parameter counts of one model."""
    from simclr_tf.models import count_parameters

    kwargs = dict(
        num_classes=args.num_classes,
        backbone=args.backbone,
        vit_size=args.vit_size,
        patch_size=args.patch_size,
        vit_pooling=args.vit_pooling,
        resnet_depth=args.resnet_depth,
        width_multiplier=args.width_multiplier,
        sk_ratio=args.sk_ratio,
        se_ratio=args.se_ratio,
        proj_head_mode=args.proj_head_mode,
        proj_out_dim=args.proj_out_dim,
        num_proj_layers=args.num_proj_layers,
        ft_proj_selector=args.ft_proj_selector,
    )
    counts = count_parameters(args.image_size, **kwargs)
    every, trainable = counts["all"], counts["trainable"]
    if args.backbone == "vit":
        name = f"ViT-{args.vit_size}/{args.patch_size} ({args.vit_pooling} pooling)"
        print(f"{name}, {args.image_size}px, num_classes={args.num_classes}")
    else:
        stem = "CIFAR" if args.image_size <= 32 else "ImageNet"
        print(
            f"{_model_name(args.resnet_depth, args.width_multiplier, args.sk_ratio, args.se_ratio)}, "
            f"{args.image_size}px ({stem} stem), num_classes={args.num_classes}"
        )
    print(f"{'part':<18}{'all variables':>16}{'trainable':>16}")
    for part in every:
        if part == "supervised_head" and args.num_classes is None:
            continue
        print(f"{part:<18}{every[part]:>16,}{trainable[part]:>16,}")
    print(f"backbone: {every['backbone'] / 1e6:.1f}M (as the SimCLRv2 table counts)")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Building ~1000 Keras layers per model creates many reference cycles, and the
    # cyclic GC then rescans them repeatedly; this short-lived process does not need it
    # (it roughly halves the table's run time). Restored on return, for callers in tests.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        if args.paper_table:
            mismatches = paper_table()
            print(
                f"{len(PAPER_BACKBONE_PARAMS) - mismatches}/{len(PAPER_BACKBONE_PARAMS)} rows match "
                f"({time.perf_counter() - start:.1f}s after imports)"
            )
            return 1 if mismatches else 0
        summary(args)
        return 0
    finally:
        if gc_was_enabled:
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
