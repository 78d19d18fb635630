"""SimCLRv2 in Keras 3 / TensorFlow 2: pretrain, finetune and distill."""

__version__ = "0.1.0"
