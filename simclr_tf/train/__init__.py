"""Training, evaluation and their shared pieces."""

from simclr_tf.train.runner import train_and_evaluate

__all__ = ["train_and_evaluate"]
