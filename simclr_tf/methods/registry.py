"""`--train_mode` name -> its `Method` class (config.TRAIN_MODES lists the same names)."""

from __future__ import annotations

from simclr_tf.methods.base import Method
from simclr_tf.methods.distill import Distill
from simclr_tf.methods.finetune import Finetune, Supervised
from simclr_tf.methods.pretrain import Pretrain

METHODS: dict[str, type[Method]] = {
    method.name: method for method in (Pretrain, Finetune, Supervised, Distill)
}
