"""Typed configuration: the one object the CLI builds from flags.

Everything below the CLI takes plain values from these dataclasses, so a test or
a notebook builds a `Config` directly without absl. Field names are the original
`tf2/run.py` flag names, and so are the defaults of the fields it has: `Config()` is
the original's setting (ResNet-50 on ImageNet). `Config.demo()` is the small run on the
embedded digits that the bare `python run.py` trains (`DEMO_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# "supervised" trains from scratch on the labels (the baseline SimCLRv2 compares with).
TRAIN_MODES = ("pretrain", "finetune", "distill", "supervised")
# Semi-supervised methods on labeled + unlabeled batches (simclr_tf/methods/).
SEMI_SUPERVISED_MODES = ("fixmatch", "uda", "mean_teacher", "debiasmatch", "dst", "s4l", "mpl", "semivit")
# Of those, the ones that fine-tune a trained classifier (--checkpoint required): no run from scratch.
SEMI_SUPERVISED_FROM_CHECKPOINT_MODES = ("semivit",)
TRAIN_MODES += SEMI_SUPERVISED_MODES
# Adapting a trained classifier to an unlabeled, shifted target domain (methods/adapt.py).
TRAIN_MODES += ("adapt",)
# Positive-unlabeled binary classification (methods/pu.py).
TRAIN_MODES += ("pu",)
# Self-training in rounds: a teacher's pseudo-labels train a noised student (methods/noisy_student.py).
TRAIN_MODES += ("noisy_student",)
# Semiformer: a ResNet and a ViT branch coupled by fusion modules; the ResNet's pseudo-labels
# train the ViT (methods/semiformer.py). Not in SEMI_SUPERVISED_MODES: its model is not the
# ResNet classifier those modes share (tools/label_efficiency.py, tests/methods/test_semi_*).
TRAIN_MODES += ("semiformer",)
PSEUDO_LABEL_TYPES = ("soft", "hard")
PU_LOSSES = ("nnpu", "unlabeled_as_negative")
# "easy_hard": Split-PU's split of the unlabeled images and its final stage (methods/split_pu.py).
PU_SPLITS = ("none", "easy_hard")
# Meta Pseudo Labels: how the teacher's prediction becomes the student's hard label.
MPL_PSEUDO_LABELS = ("argmax", "sample")
PU_SURROGATES = ("sigmoid", "logistic")
ADAPT_LOSSES = ("entropy", "gce")
ADAPT_PARAMETERS = ("batch_norm", "all")
TSA_SCHEDULES = ("none", "linear", "log", "exp")
DISTILL_VIEWS = ("consistent", "fixed")
MODES = ("train", "eval", "train_then_eval")
OPTIMIZERS = ("lars", "momentum", "adam", "adamw")
BACKBONES = ("resnet", "vit")
VIT_SIZES = ("tiny", "small", "base")  # simclr_tf.models.vit.VIT_SIZES holds their dimensions
VIT_POOLINGS = ("token", "mean")
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)  # 10: ours, not the original's
FRACTIONAL_WIDTHS = (0.25, 0.5)
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

# The demo: what the bare `python run.py` trains when --dataset is not given (or is
# mnist5k), for every flag not set on the command line or in a flagfile (see cli.py).
# A ResNet-18 x0.25 on the embedded 5,000 digits at 16x16, minutes on a laptop CPU. Fields not
# listed keep their default (the original's, which is also right at this scale).
# flags/mnist5k_default.cfg spells out the same run.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    # 16x16 digits still read as digits (a k-NN on their pixels: 0.941, 0.942 at 32x32)
    # and a step costs a sixth of one at 32x32 (ResNet-18 x0.25: 1,030 vs 161 images/s on
    # 2 AVX2 cores), so the demo trains 2.5x the epochs in less time.
    "model": {"resnet_depth": 18, "width_multiplier": 0.25, "image_size": 16},
    "data": {
        "dataset": "mnist5k",
        "cache_dataset": True,
        "color_jitter_strength": 0.5,
        "use_blur": False,
        # Digits: a mirrored 2/5/7 is another glyph, and small crops cut digits apart.
        "use_flip": False,
        "crop_min_area": 0.5,
        # Handwriting varies by small rotations, sizes and positions: views that differ so
        # teach the invariances a digit classifier needs (k-NN 0.920, 0.911 -> 0.939, 0.946 on one
        # machine, 32x32 for 20 epochs).
        "affine_rotation_degrees": 15.0,
        "affine_scale_change": 0.1,
        "affine_shift": 0.1,
    },
    "optim": {"learning_rate": 1.0, "warmup_epochs": 1.0},
    "train": {
        "mode": "train_then_eval",
        "train_batch_size": 128,
        # The learned k-NN beats raw pixels only with enough epochs (16x16: 0.934 after 20,
        # 0.956 and 0.958 after 50; raw pixels 0.941).
        "train_epochs": 50,
        "temperature": 0.2,
        "knn_eval": True,
        # The linear head trained alongside under-reports on a run this short.
        "linear_probe_eval": True,
        "log_every_steps": 25,
    },
}
# The embedded dataset the demo reads; the original has no such dataset.
DEMO_DATASET = DEMO_DEFAULTS["data"]["dataset"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    resnet_depth: int = 50
    width_multiplier: float = 1.0
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    image_size: int = 224
    batch_norm_decay: float = 0.9
    global_bn: bool = True
    proj_head_mode: str = "nonlinear"
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    zero_init_logits_layer: bool = False
    fine_tune_after_block: int = -1
    # Student noise (Noisy Student), in training only; 0 = off, as the original.
    dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    # Not in the original: a Vision Transformer instead of the ResNet (models/vit.py).
    backbone: str = "resnet"
    vit_size: str = "tiny"
    patch_size: int = 16
    vit_pooling: str = "token"

    @property
    def cifar_stem(self) -> bool:
        # As the original: 32x32 and smaller inputs get a 3x3 stride-1 stem, no max-pool.
        return self.image_size <= 32


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "imagenet2012"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    cache_dataset: bool = False
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    # Random crop and flip of every training mode (the original: 8-100% of the area, flip).
    crop_min_area: float = 0.08
    use_flip: bool = True
    # A random rotation / zoom / shift after the crop (not in the original; 0 = off).
    affine_rotation_degrees: float = 0.0
    affine_scale_change: float = 0.0
    affine_shift: float = 0.0
    # Image folders: skip (and log) files that cannot be decoded instead of failing.
    skip_bad_images: bool = False
    # Few labels: a class-balanced subset of the train split for finetune / supervised /
    # the labeled part of distill. 1.0 and 0 mean all labels.
    labeled_fraction: float = 1.0
    labeled_per_class: int = 0
    labeled_seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "lars"
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mode: str = "train"
    train_mode: str = "pretrain"
    train_batch_size: int = 512
    train_epochs: int = 100
    train_steps: int = 0
    eval_steps: int = 0
    eval_batch_size: int = 256
    checkpoint_epochs: int = 1
    checkpoint_steps: int = 0
    log_every_steps: int = 100
    lineareval_while_pretraining: bool = True
    checkpoint: str | None = None
    keep_checkpoint_max: int = 5
    keep_hub_module_max: int = 1
    temperature: float = 0.1
    hidden_norm: bool = True
    eval_name: str | None = None
    # Streamed over the train split, so host memory stays bounded (evaluation.py).
    knn_eval: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    # Most train examples in the k-NN memory bank (class-balanced, --seed); 0 = all.
    knn_bank_size: int = 100_000
    # Fit a logistic regression on frozen train-split features at eval (linear_probe.py).
    linear_probe_eval: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher_checkpoint: str | None = None
    distill_temperature: float = 1.0
    # w in (1 - w) * distillation loss + w * cross-entropy on the labeled subset.
    distill_label_weight: float = 0.0
    # "consistent": teacher and student see the same augmented view (SimCLRv2's, and Beyer
    # et al.'s "consistent teaching"); "fixed": the teacher sees the un-augmented image.
    distill_views: str = "consistent"
    # > 0: both see the same mixup of two augmented images, lambda ~ Beta(a, a) ("function
    # matching" with --distill_views=consistent); 0: no mixup.
    mixup_alpha: float = 0.0
    # The teacher's architecture; None = from the teacher run's config.json, else the student's.
    teacher_resnet_depth: int | None = None
    teacher_width_multiplier: float | None = None
    teacher_sk_ratio: float | None = None
    teacher_se_ratio: float | None = None
    teacher_proj_head_mode: str | None = None
    teacher_num_proj_layers: int | None = None
    teacher_proj_out_dim: int | None = None
    teacher_ft_proj_selector: int | None = None


@dataclasses.dataclass(frozen=True)
class SemiConfig:
    """The semi-supervised methods' hyper-parameters (defaults: each paper's, see its module)."""

    # These three: None = the method's own default (`defaults` of its class: the paper's).
    # Unlabeled images per labeled one in a step (FixMatch's mu): mu * --train_batch_size.
    unlabeled_batch_ratio: int | None = None
    # Keep a pseudo-label only when the model's probability for it reaches this.
    pseudo_label_threshold: float | None = None
    # Weight of the unlabeled term.
    unlabeled_loss_weight: float | None = None
    # UDA: sharpening temperature and confidence mask of the original-view prediction.
    uda_temperature: float = 0.4
    uda_confidence: float = 0.8
    # UDA's training-signal annealing on the labeled loss.
    tsa: str = "none"
    # Exponential moving average of the weights, kept by every semi-supervised method.
    ema_decay: float = 0.999
    # Evaluate and export the weight average instead of the trained weights.
    eval_with_ema: bool = True
    # Mean Teacher: the consistency weight ramps up over this fraction of training.
    consistency_rampup_fraction: float = 0.4
    # DebiasMatch: momentum of the running mean of predictions, and the strength (tau) of
    # both the debiasing and the adaptive margin.
    debias_momentum: float = 0.999
    debias_strength: float = 0.4
    # DST: weight of the worst-case head's term, the weight of the labeled part inside it,
    # and the largest gradient-reversal scale (reached gradually).
    dst_worst_case_weight: float = 0.3
    dst_eta_prime: float = 2.0
    dst_grl_factor: float = 0.1
    # S4L: weight of the rotation-prediction loss.
    rotation_loss_weight: float = 1.0
    # Weak view: flip and a translation of up to this fraction of the side.
    weak_translate_fraction: float = 0.125
    # Strong view: RandAugment ops per image, and Cutout's side as a fraction of the image's.
    randaugment_num_ops: int = 2
    cutout_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """`--train_mode=adapt` (self-learning under shift; defaults: Rusak et al.'s RPL)."""

    # "entropy" (ENT) or "gce" (robust pseudo-labelling: generalized cross-entropy).
    adapt_loss: str = "gce"
    gce_q: float = 0.8
    # "batch_norm": only the batch norms' scales and offsets train; "all": every weight.
    adapt_parameters: str = "batch_norm"


@dataclasses.dataclass(frozen=True)
class PuConfig:
    """`--train_mode=pu`: which classes are positive, their prior, and the risk."""

    # Comma-separated class ids or names of the train split's classes.
    positive_classes: str = ""
    # pi: the fraction of positives among the unlabeled images (assumed known, as nnPU).
    pu_prior: float = 0.0
    # "nnpu": Kiryo et al.'s non-negative risk; "unlabeled_as_negative": the biased baseline.
    pu_loss: str = "nnpu"
    # The surrogate l(z) of the 0-1 loss: "sigmoid" (the paper's) or "logistic".
    pu_surrogate: str = "sigmoid"
    # nnPU's beta and gamma: below -beta the negative risk is pushed up, scaled by gamma.
    nnpu_beta: float = 0.0
    nnpu_gamma: float = 1.0
    # "easy_hard": Split-PU (methods/split_pu.py) from the nnPU run --pu_base_checkpoint: the
    # unlabeled images are split into easy and hard ones, then a new model trains on both.
    pu_split: str = "none"
    # The base nnPU classifier: a --train_mode=pu run's model_dir or checkpoint.
    pu_base_checkpoint: str = ""
    # A split saved by an earlier run (<model_dir>/pu_split.npz): train the final stage on it.
    pu_split_file: str = ""
    # The split stops when the temporary model agrees with the base on more than this
    # fraction of the unlabeled images, or after --pu_split_max_epochs epochs.
    pu_split_agreement: float = 0.92
    pu_split_max_epochs: int = 50
    # Weights of the hard images' terms: prediction self-consistency, SimSiam feature
    # self-consistency, low-level feature cross-consistency with the base (Split-PU's).
    pu_hard_weight: float = 0.3
    pu_sim_weight: float = 0.1
    pu_feature_weight: float = 0.1


@dataclasses.dataclass(frozen=True)
class MplConfig:
    """`--train_mode=mpl` (Meta Pseudo Labels; its UDA term reads the semi section's uda_* and tsa)."""

    # Self Meta Pseudo Labels: one network is both teacher and student (no second model).
    mpl_self: bool = False
    # lr_s of the virtual student step the teacher's reward is measured on; None = the
    # optimizer's learning rate at that step.
    mpl_student_lr: float | None = None
    # Weight of the teacher's UDA consistency term (MPL's CIFAR-10 script: 8; 0 = none).
    mpl_uda_weight: float = 8.0
    # The student's label: the teacher's "argmax" on the strong view, or a "sample" of its softmax.
    mpl_pseudo_labels: str = "argmax"


@dataclasses.dataclass(frozen=True)
class NoisyStudentConfig:
    """`--train_mode=noisy_student`: rounds, and how the teacher's predictions become targets.

    The teacher is --teacher_checkpoint (the distill section's, as its architecture flags),
    the confidence filter --pseudo_label_threshold (the semi section's).
    """

    # Teacher -> student rounds; the student of round i teaches round i + 1.
    iterations: int = 1
    # "soft": the teacher's class probabilities; "hard": one-hot of its argmax.
    pseudo_label_type: str = "soft"
    # Pseudo-labelled images per class after balancing; 0 = the mean kept count per class.
    noisy_student_per_class: int = 0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    # The one default that differs from the original's (True): True would fail on every
    # machine without a TPU, and all of the original READMEs' commands pass --use_tpu.
    use_tpu: bool = False
    tpu_name: str | None = None
    tpu_zone: str | None = None
    gcp_project: str | None = None
    master: str | None = None
    # "auto": tpu with --use_tpu, multi_worker when TF_CONFIG lists several tasks,
    # mirrored with GPUs, else default (see simclr_tf.distribute.choose_strategy).
    strategy: str = "auto"
    # Keras dtype policy of the models; losses stay float32 (simclr_tf.losses).
    precision: str = "float32"
    jit_compile: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    semi: SemiConfig = dataclasses.field(default_factory=SemiConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)
    pu: PuConfig = dataclasses.field(default_factory=PuConfig)
    mpl: MplConfig = dataclasses.field(default_factory=MplConfig)
    noisy_student: NoisyStudentConfig = dataclasses.field(default_factory=NoisyStudentConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    @classmethod
    def demo(cls) -> "Config":
        """The bare `python run.py` run: DEMO_DEFAULTS over the original's defaults."""
        return cls().replace(**DEMO_DEFAULTS)

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """Returns a copy with fields overridden, e.g. `replace(train={"train_steps": 2})`."""
        updated = {
            name: dataclasses.replace(getattr(self, name), **fields)
            for name, fields in sections.items()
        }
        return dataclasses.replace(self, **updated)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]]) -> "Config":
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise ValueError(f"Unknown config section(s) {sorted(unknown)}")
        return cls(**{name: SECTIONS[name](**fields) for name, fields in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """All fields in one dict keyed by flag name."""
        out: dict[str, Any] = {}
        for section in self.to_dict().values():
            out.update(section)
        return out


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "semi": SemiConfig,
    "adapt": AdaptConfig,
    "pu": PuConfig,
    "mpl": MplConfig,
    "noisy_student": NoisyStudentConfig,
    "runtime": RuntimeConfig,
}


def section_of(field_name: str) -> str:
    """Name of the section that holds `field_name` (a flag name)."""
    for section, section_cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(section_cls)}:
            return section
    raise KeyError(field_name)


def all_field_names() -> list[str]:
    return [f.name for section_cls in SECTIONS.values() for f in dataclasses.fields(section_cls)]


def train_steps_for(config: Config, num_train_examples: int, examples_per_step: int | None = None) -> int:
    """Total optimizer steps, as the original: `train_steps` or epochs' worth (+1).

    `examples_per_step`: of the stream an epoch counts, read per global step (default
    `--train_batch_size`; more when a step also reads unlabeled images).
    """
    t = config.train
    per_step = examples_per_step or t.train_batch_size
    return t.train_steps or (num_train_examples * t.train_epochs // per_step + 1)


def warmup_steps_for(config: Config, num_train_examples: int, examples_per_step: int | None = None) -> int:
    per_step = examples_per_step or config.train.train_batch_size
    return int(round(config.optim.warmup_epochs * num_train_examples // per_step))


def epoch_steps_for(config: Config, num_train_examples: int, examples_per_step: int | None = None) -> int:
    return max(1, int(round(num_train_examples / (examples_per_step or config.train.train_batch_size))))


def checkpoint_steps_for(config: Config, num_train_examples: int, examples_per_step: int | None = None) -> int:
    t = config.train
    return t.checkpoint_steps or max(
        1, t.checkpoint_epochs * epoch_steps_for(config, num_train_examples, examples_per_step)
    )


def eval_steps_for(config: Config, num_eval_examples: int) -> int:
    return config.train.eval_steps or int(math.ceil(num_eval_examples / config.train.eval_batch_size))


class FlagError(ValueError):
    """A flag value or combination that cannot work; the message starts with `--flag`."""


def validate(config: Config) -> None:
    """Raises FlagError naming the flag for values and combinations that cannot work."""
    m, t, o, d = config.model, config.train, config.optim, config.data

    def fail(flag: str, message: str) -> None:
        raise FlagError(f"--{flag}: {message}")

    if m.backbone not in BACKBONES:
        fail("backbone", f"{m.backbone!r} is not one of {BACKBONES}.")
    if m.resnet_depth not in RESNET_DEPTHS:
        fail("resnet_depth", f"{m.resnet_depth} is not one of {RESNET_DEPTHS}.")
    if m.backbone == "vit":
        _validate_vit(m, fail)
    width = m.width_multiplier
    if not (width in FRACTIONAL_WIDTHS or (width >= 1 and float(width).is_integer())):
        fail("width_multiplier", f"{width} is not a positive integer or one of {FRACTIONAL_WIDTHS}.")
    for flag in ("sk_ratio", "se_ratio", "dropout_rate", "stochastic_depth_rate"):
        if not 0 <= getattr(m, flag) < 1:
            fail(flag, f"{getattr(m, flag)} must be in [0, 1).")
    if m.image_size < 8:
        fail("image_size", f"{m.image_size} is too small for a ResNet; use 32 or more.")
    if m.proj_head_mode not in PROJ_HEAD_MODES:
        fail("proj_head_mode", f"{m.proj_head_mode!r} is not one of {PROJ_HEAD_MODES}.")
    num_layers = {"none": 0, "linear": 1, "nonlinear": m.num_proj_layers}[m.proj_head_mode]
    if m.proj_head_mode == "nonlinear" and m.num_proj_layers < 1:
        fail("num_proj_layers", "must be at least 1 for a nonlinear head.")
    if not -1 <= m.ft_proj_selector <= num_layers:
        fail(
            "ft_proj_selector",
            f"{m.ft_proj_selector} is out of range for a {m.proj_head_mode} head with "
            f"{num_layers} layer(s): use 0..{num_layers} or -1 (the last layer).",
        )
    if not -1 <= m.fine_tune_after_block <= 4:
        fail("fine_tune_after_block", f"{m.fine_tune_after_block} must be in -1..4.")
    if t.train_mode not in TRAIN_MODES:
        fail("train_mode", f"{t.train_mode!r} is not one of {TRAIN_MODES}.")
    if t.mode not in MODES:
        fail("mode", f"{t.mode!r} is not one of {MODES}.")
    if t.train_mode != "finetune" and m.fine_tune_after_block != -1:
        fail(
            "fine_tune_after_block",
            f"layer freezing is for --train_mode=finetune; use -1 with --train_mode={t.train_mode}.",
        )
    if not 0 < d.labeled_fraction <= 1:
        fail("labeled_fraction", f"{d.labeled_fraction} must be in (0, 1], e.g. 0.01 for 1% of the labels.")
    if d.labeled_per_class < 0:
        fail("labeled_per_class", "must be 0 (use --labeled_fraction) or a positive count.")
    x = config.distill
    if t.train_mode == "distill":
        if not x.teacher_checkpoint:
            fail("teacher_checkpoint", "distillation needs a fine-tuned teacher: pass its model_dir or checkpoint.")
    if t.train_mode == "noisy_student" and not x.teacher_checkpoint:
        fail("teacher_checkpoint", "--train_mode=noisy_student needs the first round's teacher, a trained "
             "classifier (e.g. a finetune run): pass its model_dir or checkpoint.")
        if x.distill_temperature <= 0:
            fail("distill_temperature", "must be positive.")
        if not 0 <= x.distill_label_weight <= 1:
            fail("distill_label_weight", f"{x.distill_label_weight} must be in [0, 1].")
    if x.distill_views not in DISTILL_VIEWS:
        fail("distill_views", f"{x.distill_views!r} is not one of {DISTILL_VIEWS}.")
    if not x.mixup_alpha >= 0:
        fail("mixup_alpha", f"{x.mixup_alpha} must be >= 0 (0: no mixup).")
    if x.mixup_alpha > 0 and x.distill_views == "fixed":
        fail("mixup_alpha", "mixup needs --distill_views=consistent: a fixed teacher sees the image un-augmented and unmixed.")
    if t.train_mode == "supervised" and t.checkpoint:
        fail("checkpoint", "--train_mode=supervised trains from scratch; use --train_mode=finetune to start from a checkpoint.")
    _validate_semi(config.semi, fail)
    a = config.adapt
    if a.adapt_loss not in ADAPT_LOSSES:
        fail("adapt_loss", f"{a.adapt_loss!r} is not one of {ADAPT_LOSSES}.")
    if not 0 < a.gce_q <= 1:
        fail("gce_q", f"{a.gce_q} must be in (0, 1] (0.8: Rusak et al.'s).")
    if a.adapt_parameters not in ADAPT_PARAMETERS:
        fail("adapt_parameters", f"{a.adapt_parameters!r} is not one of {ADAPT_PARAMETERS}.")
    pu = config.pu
    if pu.pu_loss not in PU_LOSSES:
        fail("pu_loss", f"{pu.pu_loss!r} is not one of {PU_LOSSES}.")
    if pu.pu_surrogate not in PU_SURROGATES:
        fail("pu_surrogate", f"{pu.pu_surrogate!r} is not one of {PU_SURROGATES}.")
    if t.train_mode == "pu":
        if not pu.positive_classes.strip():
            fail("positive_classes", "--train_mode=pu needs the positive classes, e.g. --positive_classes=3 or =cat.")
        if not 0 < pu.pu_prior < 1:
            fail("pu_prior", f"{pu.pu_prior} must be in (0, 1): the fraction of positives among the unlabeled images.")
    if not pu.nnpu_beta >= 0 or not pu.nnpu_gamma > 0:
        fail("nnpu_beta", "--nnpu_beta must be >= 0 and --nnpu_gamma > 0.")
    if pu.pu_split not in PU_SPLITS:
        fail("pu_split", f"{pu.pu_split!r} is not one of {PU_SPLITS}.")
    if t.train_mode == "pu" and pu.pu_split == "easy_hard" and not pu.pu_base_checkpoint:
        fail("pu_base_checkpoint", "--pu_split=easy_hard needs the base nnPU classifier: pass the model_dir "
             "or a checkpoint of a --train_mode=pu run.")
    if pu.pu_split_file and pu.pu_split != "easy_hard":
        fail("pu_split_file", "a saved split is for --pu_split=easy_hard.")
    if not 0 < pu.pu_split_agreement <= 1:
        fail("pu_split_agreement", f"{pu.pu_split_agreement} must be in (0, 1]: the temporary model's agreement "
             "with the base that ends the split.")
    if pu.pu_split_max_epochs < 1:
        fail("pu_split_max_epochs", "must be at least 1.")
    for flag in ("pu_hard_weight", "pu_sim_weight", "pu_feature_weight"):
        if not getattr(pu, flag) >= 0:
            fail(flag, "must be >= 0 (0 turns the term off).")
    mpl = config.mpl
    if mpl.mpl_student_lr is not None and not mpl.mpl_student_lr > 0:
        fail("mpl_student_lr", f"{mpl.mpl_student_lr} must be positive (or left out: the optimizer's learning rate).")
    if not mpl.mpl_uda_weight >= 0:
        fail("mpl_uda_weight", f"{mpl.mpl_uda_weight} must be >= 0 (0: no UDA term).")
    if mpl.mpl_pseudo_labels not in MPL_PSEUDO_LABELS:
        fail("mpl_pseudo_labels", f"{mpl.mpl_pseudo_labels!r} is not one of {MPL_PSEUDO_LABELS}.")
    ns = config.noisy_student
    if ns.iterations < 1:
        fail("iterations", f"{ns.iterations} must be at least 1 (teacher -> student rounds).")
    if ns.pseudo_label_type not in PSEUDO_LABEL_TYPES:
        fail("pseudo_label_type", f"{ns.pseudo_label_type!r} is not one of {PSEUDO_LABEL_TYPES}.")
    if ns.noisy_student_per_class < 0:
        fail("noisy_student_per_class", "must be 0 (the mean kept count per class) or a positive count.")
    if o.optimizer not in OPTIMIZERS:
        fail("optimizer", f"{o.optimizer!r} is not one of {OPTIMIZERS}.")
    for flag in ("train_batch_size", "eval_batch_size"):
        if getattr(t, flag) < 1:
            fail(flag, "must be positive.")
    if t.train_steps < 0 or t.train_epochs < 0 or (t.train_steps == 0 and t.train_epochs == 0):
        fail("train_steps", "set --train_steps or --train_epochs to a positive number.")
    if t.temperature <= 0:
        fail("temperature", "must be positive.")
    if not o.learning_rate >= 0:  # also rejects NaN
        fail("learning_rate", f"{o.learning_rate} must be a non-negative number.")
    if t.knn_bank_size < 0:
        fail("knn_bank_size", "must be 0 (the whole train split) or a positive number of examples.")
    if t.knn_k < 1:
        fail("knn_k", "must be at least 1.")
    if t.log_every_steps < 1:
        fail("log_every_steps", "must be at least 1.")
    if t.checkpoint_steps < 0 or t.checkpoint_epochs < 0:
        fail("checkpoint_steps", "--checkpoint_steps and --checkpoint_epochs must not be negative.")
    if t.keep_checkpoint_max < 1:
        fail("keep_checkpoint_max", "must be at least 1: resuming needs the latest checkpoint.")
    if not d.color_jitter_strength >= 0:
        fail("color_jitter_strength", f"{d.color_jitter_strength} must be >= 0 (0 turns colour jitter off).")
    if not 0 < d.crop_min_area <= 1:
        fail("crop_min_area", f"{d.crop_min_area} must be in (0, 1]: the smallest crop's fraction of the image area.")
    for name, value, bound, meaning in (
        ("affine_rotation_degrees", d.affine_rotation_degrees, 180.0, "the largest rotation either way, in degrees"),
        ("affine_scale_change", d.affine_scale_change, 0.99, "the largest relative zoom in or out"),
        ("affine_shift", d.affine_shift, 0.5, "the largest shift either way, as a fraction of the side"),
    ):
        if not 0 <= value <= bound:
            fail(name, f"{value} must be in [0, {bound}]: {meaning} (0 turns it off).")
    if not d.dataset:
        fail("dataset", "is empty; use mnist5k, folder:/path or a TFDS name.")
    r = config.runtime
    if r.strategy not in STRATEGIES:
        fail("strategy", f"{r.strategy!r} is not one of {STRATEGIES}.")
    if r.use_tpu and r.strategy not in ("auto", "tpu"):
        fail("strategy", f"--strategy={r.strategy} contradicts --use_tpu; use --strategy=auto or tpu.")
    if r.precision not in PRECISIONS:
        fail("precision", f"{r.precision!r} is not one of {PRECISIONS}.")


def _validate_vit(m: ModelConfig, fail) -> None:
    if m.vit_size not in VIT_SIZES:
        fail("vit_size", f"{m.vit_size!r} is not one of {VIT_SIZES}.")
    if m.vit_pooling not in VIT_POOLINGS:
        fail("vit_pooling", f"{m.vit_pooling!r} is not one of {VIT_POOLINGS}.")
    if m.patch_size < 1 or m.image_size % m.patch_size:
        fail(
            "patch_size",
            f"{m.patch_size} does not divide --image_size={m.image_size}: use 4 for 32 px images, 16 for 224 px.",
        )
    # Options that would change a ResNet's output but not a ViT's. (--resnet_depth and
    # --width_multiplier are ignored: the demo's defaults set them.)
    for flag in ("sk_ratio", "se_ratio"):
        if getattr(m, flag):
            fail(flag, "is a ResNet option; use 0 with --backbone=vit.")


def _validate_semi(semi: SemiConfig, fail) -> None:
    if semi.unlabeled_batch_ratio is not None and semi.unlabeled_batch_ratio < 1:
        fail("unlabeled_batch_ratio", "must be at least 1 (unlabeled images per labeled one).")
    for flag in ("pseudo_label_threshold", "uda_confidence"):
        value = getattr(semi, flag)
        if value is not None and not 0 <= value <= 1:
            fail(flag, f"{value} must be a probability in [0, 1].")
    if semi.unlabeled_loss_weight is not None and not semi.unlabeled_loss_weight >= 0:
        fail("unlabeled_loss_weight", "must be >= 0 (or left out for the method's default).")
    if not semi.uda_temperature > 0:
        fail("uda_temperature", "must be positive.")
    if semi.tsa not in TSA_SCHEDULES:
        fail("tsa", f"{semi.tsa!r} is not one of {TSA_SCHEDULES}.")
    for flag in ("ema_decay", "debias_momentum"):
        if not 0 <= getattr(semi, flag) < 1:
            fail(flag, f"{getattr(semi, flag)} must be in [0, 1).")
    if not 0 <= semi.consistency_rampup_fraction <= 1:
        fail("consistency_rampup_fraction", "must be in [0, 1] (0: no ramp-up).")
    for flag in ("debias_strength", "dst_worst_case_weight", "dst_eta_prime", "dst_grl_factor", "rotation_loss_weight"):
        if not getattr(semi, flag) >= 0:
            fail(flag, "must be >= 0.")
    if not 0 <= semi.weak_translate_fraction < 0.5:
        fail("weak_translate_fraction", "must be in [0, 0.5).")
    if semi.randaugment_num_ops < 0:
        fail("randaugment_num_ops", "must be >= 0.")
    if not 0 <= semi.cutout_fraction <= 1:
        fail("cutout_fraction", "must be in [0, 1] (0: no Cutout).")
