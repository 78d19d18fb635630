"""SimCLRv2 in Keras 3 / TensorFlow 2: pretrain, finetune and distill."""

import os

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512-class
# features; on AVX2-only CPUs it falls back to Eigen, whose convolution gradients made a
# ResNet-18 x0.25 training step 2.2x slower on a 2-core AMD EPYC (README, "Measuring speed").
# Effective only if this package is imported before TensorFlow; an explicit
# TF_ENABLE_ONEDNN_OPTS=0 is respected.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
