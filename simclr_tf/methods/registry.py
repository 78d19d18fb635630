"""`--train_mode` name -> its `Method` class (config.TRAIN_MODES lists the same names)."""

from __future__ import annotations

from simclr_tf.methods.adapt import Adapt
from simclr_tf.methods.base import Method
from simclr_tf.methods.debiasmatch import DebiasMatch
from simclr_tf.methods.distill import Distill
from simclr_tf.methods.dst import Dst
from simclr_tf.methods.finetune import Finetune, Supervised
from simclr_tf.methods.fixmatch import FixMatch
from simclr_tf.methods.mean_teacher import MeanTeacher
from simclr_tf.methods.mpl import Mpl
from simclr_tf.methods.noisy_student import NoisyStudent
from simclr_tf.methods.pretrain import Pretrain
from simclr_tf.methods.pu import Pu
from simclr_tf.methods.s4l import S4l
from simclr_tf.methods.semiformer import Semiformer
from simclr_tf.methods.semivit import SemiVit
from simclr_tf.methods.uda import Uda

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (Pretrain, Finetune, Supervised, Distill, FixMatch, Uda, MeanTeacher, DebiasMatch, Dst, S4l, Mpl, SemiVit, Adapt, Pu, NoisyStudent, Semiformer)
}
