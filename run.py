"""SimCLRv2 pretraining, fine-tuning and distillation: `python run.py --help`.

Defaults are the original google-research/simclr run.py's, so its READMEs' commands work
as they are. Without --dataset the run is a small demo on embedded digits:
`python run.py --mode=train_then_eval --train_mode=pretrain`.
"""

from absl import flags

from simclr_tf import cli

# So that `--help` lists the SimCLR flags, not only those defined in this file.
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
    cli.run()
