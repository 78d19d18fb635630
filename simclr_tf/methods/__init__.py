"""Train modes: one module per method; `registry.METHODS` maps `--train_mode` to it."""
