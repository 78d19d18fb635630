"""SimCLRv2 pretraining, fine-tuning and distillation: `python run.py --help`."""

from absl import flags

from simclr_tf import cli

# So that `--help` lists the SimCLR flags, not only those defined in this file.
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
    cli.run()
