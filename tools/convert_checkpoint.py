"""Convert a checkpoint of the original google-research/simclr TF2 code into ours.

    python tools/convert_checkpoint.py \\
        --source=gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk1/saved_model/ \\
        --output_dir=runs/r50_1x_sk1
    python run.py --train_mode=finetune --checkpoint=runs/r50_1x_sk1 --image_size=224 \\
        --resnet_depth=50 --width_multiplier=1 --sk_ratio=0.0625 ...

`--source` is a released SavedModel directory (or a copy of it), or a training checkpoint
of the original `tf2/run.py` (a `ckpt-N` prefix or its directory). The architecture is
read from the variables; the output directory gets `ckpt-<step>` (what `--checkpoint`
and `--teacher_checkpoint` take), `config.json` (the architecture; distillation reads the
teacher's from it), `conversion.json` (which original variable went where) and, with
`--export_saved_model`, our SavedModel export under `saved_model/<step>/`. It prints the
`run.py` flags that build the same model. Exits 1 with the list of the variables it cannot
place (name and shape) if the checkpoint does not fit.

Which hidden the classifier reads (`ft_proj_selector`) is read from the SavedModel's graph
(`saved_model.pb`, parsed, never run). Without a graph (a training checkpoint, or a copy of
`variables/` only) it is read from shapes when only one hidden has the classifier's input
width; otherwise the tool exits 1 asking for `--ft_proj_selector`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The flags that build the converted model with run.py.
ARCHITECTURE_FLAGS = (
    "resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "image_size",
    "proj_head_mode", "num_proj_layers", "proj_out_dim", "ft_proj_selector",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="original SavedModel directory or checkpoint")
    parser.add_argument("--output_dir", required=True, help="new directory for our checkpoint")
    parser.add_argument(
        "--image_size", type=int, default=None,
        help="input size the model is used at (config.json); default 224, or 32 for a CIFAR stem",
    )
    parser.add_argument(
        "--ft_proj_selector", type=int, default=None,
        help="hidden the supervised head reads (0: backbone, k: projection layer k-1); read from a "
        "SavedModel's saved_model.pb when present, else needed when shapes leave it open",
    )
    parser.add_argument("--sk_ratio", type=float, default=None, help="override the inferred SK ratio")
    parser.add_argument("--se_ratio", type=float, default=None, help="override the inferred SE ratio")
    parser.add_argument(
        "--drop_supervised_head", action="store_true",
        help="leave out the original's classifier (to fine-tune on other classes)",
    )
    parser.add_argument("--export_saved_model", action="store_true", help="also write saved_model/<step>/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from simclr_tf import convert

    try:
        converted = convert.convert_checkpoint(
            args.source,
            args.output_dir,
            export_saved_model=args.export_saved_model,
            image_size=args.image_size,
            ft_proj_selector=args.ft_proj_selector,
            sk_ratio=args.sk_ratio,
            se_ratio=args.se_ratio,
            supervised_head=not args.drop_supervised_head,
        )
    except (convert.ConversionError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"convert_checkpoint: {error}", file=sys.stderr)
        return 1
    model = converted.config.model
    print(f"Wrote {converted.checkpoint}")
    print(f"ft_proj_selector={model.ft_proj_selector} (from {converted.selector_from})")
    if converted.saved_model:
        print(f"Wrote {converted.saved_model}")
    print("run.py flags for this model:")
    print("  " + " ".join(f"--{name}={getattr(model, name):g}" if isinstance(getattr(model, name), float)
                          else f"--{name}={getattr(model, name)}" for name in ARCHITECTURE_FLAGS))
    print(f"  --checkpoint={args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
