"""The absl command line: the only module that reads FLAGS.

Flag names, meanings and defaults are those of the original `tf2/run.py` (except
`--use_tpu`, False here), so a command copied from the original's READMEs trains what it
trained there; the TF1 `run.py`'s own flags are accepted with a note (`tf1_notes`).
Without `--dataset` (or with `--dataset=mnist5k`) the run is the embedded demo instead:
`config.DEMO_DEFAULTS` fills every flag left out, a small run that finishes in minutes
on a laptop CPU. Recipes live in `flags/*.cfg` (`--flagfile=flags/<recipe>.cfg`).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from simclr_tf import config as config_lib

FLAGS = flags.FLAGS
_d = config_lib.Config()  # The original's defaults, from the dataclasses: one source of truth.

# --- optimisation
flags.DEFINE_float("learning_rate", _d.optim.learning_rate, "Initial learning rate per batch size of 256 (linear scaling) or the multiplier of sqrt(batch size).")
flags.DEFINE_enum("learning_rate_scaling", _d.optim.learning_rate_scaling, ["linear", "sqrt"], "How to scale the learning rate as a function of batch size.")
flags.DEFINE_float("warmup_epochs", _d.optim.warmup_epochs, "Number of epochs of linear warm-up.")
flags.DEFINE_float("weight_decay", _d.optim.weight_decay, "Amount of weight decay to use.")
flags.DEFINE_enum("optimizer", _d.optim.optimizer, list(config_lib.OPTIMIZERS), "Optimizer: lars, momentum (SGD with Nesterov momentum), adam, or adamw (Adam with decoupled weight decay --weight_decay, e.g. 0.05 for a ViT; not in the original).")
flags.DEFINE_float("momentum", _d.optim.momentum, "Momentum parameter.")
# --- training schedule
flags.DEFINE_integer("train_batch_size", _d.train.train_batch_size, "Global batch size for training.")
flags.DEFINE_integer("train_epochs", _d.train.train_epochs, "Number of epochs to train for.")
flags.DEFINE_integer("train_steps", _d.train.train_steps, "Number of steps to train for. If provided, overrides train_epochs.")
flags.DEFINE_integer("eval_steps", _d.train.eval_steps, "Number of steps to eval for. If not provided, evals over the entire split.")
flags.DEFINE_integer("eval_batch_size", _d.train.eval_batch_size, "Global batch size for eval.")
flags.DEFINE_integer("checkpoint_epochs", _d.train.checkpoint_epochs, "Number of epochs between checkpoints.")
flags.DEFINE_integer("checkpoint_steps", _d.train.checkpoint_steps, "Number of steps between checkpoints. If provided, overrides checkpoint_epochs.")
flags.DEFINE_integer("log_every_steps", _d.train.log_every_steps, "Steps between log lines and TensorBoard scalars (independent of checkpoints).")
flags.DEFINE_integer("seed", _d.train.seed, "Seed for shuffling the training data.")
# --- data
flags.DEFINE_string("dataset", _d.data.dataset, "'mnist5k' (embedded, no download), 'folder:/path/to/root' (root/<split>/<class>/<images>) or a TFDS name such as 'imagenet2012' or 'cifar10'. Not given, or mnist5k: the embedded demo, whose defaults (shown as 'Demo default') replace the original's for the flags not given.")
flags.DEFINE_string("data_dir", _d.data.data_dir, "TFDS data directory.")
flags.DEFINE_string("train_split", _d.data.train_split, "Split for training; TFDS slicing works for every source, e.g. 'train[:90%]'.")
flags.DEFINE_string("eval_split", _d.data.eval_split, "Split for evaluation, e.g. 'validation', 'test' or 'train[90%:]'.")
flags.DEFINE_bool("cache_dataset", _d.data.cache_dataset, "Cache the decoded dataset in memory (good for small datasets, a very bad idea for ImageNet).")
flags.DEFINE_integer("image_size", _d.model.image_size, "Input image size; <= 32 selects the CIFAR stem (3x3 conv, no max-pool).")
flags.DEFINE_float("color_jitter_strength", _d.data.color_jitter_strength, "The strength of colour jittering.")
flags.DEFINE_bool("use_blur", _d.data.use_blur, "Whether or not to use Gaussian blur for augmentation during pretraining.")
flags.DEFINE_float("affine_rotation_degrees", _d.data.affine_rotation_degrees, "Training views: a random rotation of up to this many degrees either way after the crop (not in the original; 0 = off).")
flags.DEFINE_float("affine_scale_change", _d.data.affine_scale_change, "Training views: a random zoom by a factor in [1 - x, 1 + x] after the crop (not in the original; 0 = off).")
flags.DEFINE_float("affine_shift", _d.data.affine_shift, "Training views: a random shift of up to this fraction of the side either way after the crop (not in the original; 0 = off).")
flags.DEFINE_float("crop_min_area", _d.data.crop_min_area, "Smallest random crop in training, as a fraction of the image area (crops cover crop_min_area-100%; the original: 0.08). Larger keeps small digits recognisable.")
flags.DEFINE_bool("use_flip", _d.data.use_flip, "Randomly flip training images left-right (the original always does). Turn off for digits and text, where a mirror image is another glyph.")
flags.DEFINE_bool("skip_bad_images", _d.data.skip_bad_images, "Image folders: skip files that cannot be decoded (each is logged with a running count) instead of stopping with an error that names the file.")
flags.DEFINE_float("labeled_fraction", _d.data.labeled_fraction, "Fraction of each class's labels used by finetune / supervised / distill and the semi-supervised modes (e.g. 0.01 or 0.1); 1.0 = all. A fixed, class-balanced subset of --train_split.")
flags.DEFINE_integer("labeled_per_class", _d.data.labeled_per_class, "If > 0, use this many labeled examples per class instead of --labeled_fraction.")
flags.DEFINE_integer("labeled_seed", _d.data.labeled_seed, "Seed choosing the labeled subset (nested: 1% is inside 10% for the same seed).")
# --- what to run
flags.DEFINE_enum("mode", _d.train.mode, list(config_lib.MODES), "Whether to train, evaluate (following new checkpoints), or both. The default is the original's; the original READMEs' pretraining commands rely on it.")
flags.DEFINE_enum("train_mode", _d.train.train_mode, list(config_lib.TRAIN_MODES), "pretrain (contrastive), finetune (labels, from --checkpoint), distill (a teacher's soft labels), supervised (labels, from scratch), or a semi-supervised method on labeled + unlabeled batches: fixmatch, uda, mean_teacher, debiasmatch, dst, s4l, mpl (from scratch, or from --checkpoint), semivit (from a fine-tuned --checkpoint), adapt (a trained classifier from --checkpoint adapts to unlabeled images of --dataset), pu (positive-unlabeled binary classification), or noisy_student (rounds of a teacher's balanced pseudo-labels training a noised student; --teacher_checkpoint, --iterations).")
flags.DEFINE_bool("lineareval_while_pretraining", _d.train.lineareval_while_pretraining, "Train a linear head on stop-gradient features while pretraining.")
flags.DEFINE_string("checkpoint", _d.train.checkpoint, "Checkpoint (prefix or directory) to initialise from when model_dir holds none, e.g. a pretraining run for fine-tuning; with --mode=eval it is evaluated once. Original SimCLR checkpoints: convert them with tools/convert_checkpoint.py.")
flags.DEFINE_bool("zero_init_logits_layer", _d.model.zero_init_logits_layer, "Zero-initialise the supervised head after restoring --checkpoint.")
flags.DEFINE_integer("fine_tune_after_block", _d.model.fine_tune_after_block, "Fine-tune the layers after this block: -1 everything, 0 after the stem, 1-3 after that block group, 4 just the linear head.")
flags.DEFINE_string("model_dir", None, "Directory for checkpoints, summaries, flags.json and result.json. Default: runs/<train_mode>_<dataset>.")
flags.DEFINE_string("eval_name", _d.train.eval_name, "Name for eval; eval summaries then go to <model_dir>/eval_<eval_name>.")
flags.DEFINE_integer("keep_checkpoint_max", _d.train.keep_checkpoint_max, "Maximum number of checkpoints to keep.")
flags.DEFINE_integer("keep_hub_module_max", _d.train.keep_hub_module_max, "Maximum number of SavedModel exports (<model_dir>/saved_model/<step>/, written at the end of training) to keep; 0 exports none.")
flags.DEFINE_bool("knn_eval", _d.train.knn_eval, "Also report weighted k-NN accuracy on backbone features (always done when there is no supervised head).")
flags.DEFINE_integer("knn_k", _d.train.knn_k, "Neighbours for the k-NN evaluation.")
flags.DEFINE_bool("linear_probe_eval", _d.train.linear_probe_eval, "Also fit a logistic regression on frozen backbone features of --train_split at eval and report its accuracy on --eval_split as eval/linear_probe_top_1_accuracy (a proper linear evaluation; seconds on small data).")
flags.DEFINE_float("knn_temperature", _d.train.knn_temperature, "Temperature of the k-NN vote weights exp(similarity / T).")
flags.DEFINE_integer("knn_bank_size", _d.train.knn_bank_size, "Most train examples in the k-NN memory bank: above it, a class-balanced subset chosen with --seed. 0 = the whole train split.")
# --- distillation
flags.DEFINE_string("teacher_checkpoint", _d.distill.teacher_checkpoint, "Fine-tuned teacher (model_dir or checkpoint prefix) for --train_mode=distill, and the first round's teacher of --train_mode=noisy_student.")
flags.DEFINE_float("distill_temperature", _d.distill.distill_temperature, "Temperature of the teacher's and student's softmax in the distillation loss.")
flags.DEFINE_float("distill_label_weight", _d.distill.distill_label_weight, "w in (1 - w) * distillation loss + w * cross-entropy on the labeled subset; 0 = labels unused.")
flags.DEFINE_enum("distill_views", _d.distill.distill_views, list(config_lib.DISTILL_VIEWS), "distill: consistent (teacher and student see the same augmented view) or fixed (the teacher sees the image un-augmented, the student an augmented view). Not in the original (its distillation is consistent).")
flags.DEFINE_float("mixup_alpha", _d.distill.mixup_alpha, "distill: > 0 mixes pairs of the augmented images (lambda ~ Beta(a, a)) and shows teacher and student the same mix (function matching); 0 = no mixup.")
flags.DEFINE_integer("teacher_resnet_depth", None, "Teacher ResNet depth (default: from the teacher run's config.json, else the student's).")
flags.DEFINE_float("teacher_width_multiplier", None, "Teacher width multiplier (default: teacher config.json, else the student's).")
flags.DEFINE_float("teacher_sk_ratio", None, "Teacher selective-kernel ratio (default: teacher config.json, else the student's).")
flags.DEFINE_float("teacher_se_ratio", None, "Teacher squeeze-excitation ratio (default: teacher config.json, else the student's).")
flags.DEFINE_enum("teacher_proj_head_mode", None, list(config_lib.PROJ_HEAD_MODES), "Teacher projection head mode (default: teacher config.json, else the student's).")
flags.DEFINE_integer("teacher_num_proj_layers", None, "Teacher projection layers (default: teacher config.json, else the student's).")
flags.DEFINE_integer("teacher_proj_out_dim", None, "Teacher projection output size (default: teacher config.json, else the student's).")
flags.DEFINE_integer("teacher_ft_proj_selector", None, "Teacher's --ft_proj_selector (default: teacher config.json, else the student's).")
# --- semi-supervised methods (--train_mode=fixmatch|uda|mean_teacher|debiasmatch|dst|s4l|mpl)
flags.DEFINE_integer("unlabeled_batch_ratio", _d.semi.unlabeled_batch_ratio, "Unlabeled images per labeled one in a step (FixMatch's mu): a step reads --train_batch_size labeled and mu times as many unlabeled images; an epoch is a pass over the unlabeled ones. Not given: the method's default (7; s4l: 1, its recipe's).")
flags.DEFINE_float("pseudo_label_threshold", _d.semi.pseudo_label_threshold, "Keep a pseudo-label only when its probability is at least this (fixmatch; debiasmatch: the debiased probability; dst: strictly above). Not given: 0.95 (debiasmatch: 0.8, DebiasPL's; noisy_student: 0.3, the teacher's probability for its label, as the paper's filter). An error with uda (it uses --uda_confidence), mean_teacher and s4l, which keep no pseudo-labels, and mpl, which keeps all.")
flags.DEFINE_float("unlabeled_loss_weight", _d.semi.unlabeled_loss_weight, "Weight of the unlabeled term (dst: of the self-training term; an error with s4l: see --rotation_loss_weight, and mpl: see --mpl_uda_weight). Not given: the method's default (1; mean_teacher: 50; debiasmatch: 10).")
flags.DEFINE_float("uda_temperature", _d.semi.uda_temperature, "UDA: sharpening temperature of the original view's prediction.")
flags.DEFINE_float("uda_confidence", _d.semi.uda_confidence, "UDA: confidence mask threshold of the original view's prediction.")
flags.DEFINE_enum("tsa", _d.semi.tsa, list(config_lib.TSA_SCHEDULES), "UDA: training-signal annealing schedule of the labeled loss.")
flags.DEFINE_float("ema_decay", _d.semi.ema_decay, "Decay of the exponential moving average of the weights the semi-supervised methods keep.")
flags.DEFINE_bool("eval_with_ema", _d.semi.eval_with_ema, "Semi-supervised methods: evaluate and export the weight average (as their papers report).")
flags.DEFINE_float("consistency_rampup_fraction", _d.semi.consistency_rampup_fraction, "Mean Teacher: the consistency weight ramps up (sigmoid-shaped) over this fraction of training.")
flags.DEFINE_float("debias_momentum", _d.semi.debias_momentum, "DebiasMatch: momentum of the running mean of the unlabeled predictions.")
flags.DEFINE_float("debias_strength", _d.semi.debias_strength, "DebiasMatch: strength of the debiasing (and of the adaptive margin).")
flags.DEFINE_float("dst_worst_case_weight", _d.semi.dst_worst_case_weight, "DST: weight of the worst-case head's term.")
flags.DEFINE_float("dst_eta_prime", _d.semi.dst_eta_prime, "DST: weight of the labeled part inside the worst-case term.")
flags.DEFINE_float("dst_grl_factor", _d.semi.dst_grl_factor, "DST: largest scale of the gradient reversal between the features and the worst-case head (reached gradually).")
flags.DEFINE_float("rotation_loss_weight", _d.semi.rotation_loss_weight, "S4L: weight of the rotation-prediction loss.")
flags.DEFINE_float("weak_translate_fraction", _d.semi.weak_translate_fraction, "Weak view: flip (--use_flip) and a random translation of up to this fraction of the side.")
flags.DEFINE_integer("randaugment_num_ops", _d.semi.randaugment_num_ops, "Strong view: RandAugment operations per image (after the weak view's flip and translation).")
flags.DEFINE_float("cutout_fraction", _d.semi.cutout_fraction, "Strong view: Cutout square's side as a fraction of the image side (0: none).")
# --- adaptation to a shifted domain (--train_mode=adapt)
flags.DEFINE_enum("adapt_loss", _d.adapt.adapt_loss, list(config_lib.ADAPT_LOSSES), "adapt: entropy (entropy minimisation) or gce (robust pseudo-labelling: generalized cross-entropy of the model's own hard labels).")
flags.DEFINE_float("gce_q", _d.adapt.gce_q, "adapt: q of the generalized cross-entropy, in (0, 1].")
flags.DEFINE_enum("adapt_parameters", _d.adapt.adapt_parameters, list(config_lib.ADAPT_PARAMETERS), "adapt: batch_norm trains only the batch norms' scales and offsets; all trains every weight.")
# --- positive-unlabeled learning (--train_mode=pu)
flags.DEFINE_string("positive_classes", _d.pu.positive_classes, "pu: comma-separated ids or names of the positive classes; every other class is negative.")
flags.DEFINE_float("pu_prior", _d.pu.pu_prior, "pu: the fraction of positives among the unlabeled images (class prior pi, assumed known).")
flags.DEFINE_enum("pu_loss", _d.pu.pu_loss, list(config_lib.PU_LOSSES), "pu: nnpu (non-negative PU risk) or unlabeled_as_negative (the biased baseline).")
flags.DEFINE_enum("pu_surrogate", _d.pu.pu_surrogate, list(config_lib.PU_SURROGATES), "pu: the surrogate loss l(z) of a score: sigmoid(-z) (the paper's) or logistic softplus(-z), whose gradient does not vanish on wrongly scored examples.")
flags.DEFINE_float("nnpu_beta", _d.pu.nnpu_beta, "pu: nnPU's beta: a negative-risk estimate below -beta is pushed back up.")
flags.DEFINE_float("nnpu_gamma", _d.pu.nnpu_gamma, "pu: nnPU's gamma: the scale of that push.")
flags.DEFINE_enum("pu_split", _d.pu.pu_split, list(config_lib.PU_SPLITS), "pu: none (nnPU) or easy_hard (Split-PU: the base nnPU run --pu_base_checkpoint splits the unlabeled images into easy and hard ones, a new model trains on both; stages in <model_dir>/split and <model_dir>/final).")
flags.DEFINE_string("pu_base_checkpoint", _d.pu.pu_base_checkpoint, "pu --pu_split=easy_hard: the base nnPU classifier, the model_dir or a checkpoint of a --train_mode=pu run.")
flags.DEFINE_string("pu_split_file", _d.pu.pu_split_file, "pu --pu_split=easy_hard: a split saved by an earlier run (its <model_dir>/pu_split.npz); trains the final stage on it instead of splitting again.")
flags.DEFINE_float("pu_split_agreement", _d.pu.pu_split_agreement, "pu --pu_split=easy_hard: the split ends once the temporary model agrees with the base on more than this fraction of the unlabeled images (Split-PU's 0.92).")
flags.DEFINE_integer("pu_split_max_epochs", _d.pu.pu_split_max_epochs, "pu --pu_split=easy_hard: at most this many epochs of the temporary model, one run each in <model_dir>/split/epoch_<e>.")
flags.DEFINE_float("pu_hard_weight", _d.pu.pu_hard_weight, "pu --pu_split=easy_hard: weight of the hard images' prediction self-consistency (weak-view probability, where confident, as the strong view's BCE target).")
flags.DEFINE_float("pu_sim_weight", _d.pu.pu_sim_weight, "pu --pu_split=easy_hard: weight of the hard images' SimSiam feature self-consistency between their weak and strong views.")
flags.DEFINE_float("pu_feature_weight", _d.pu.pu_feature_weight, "pu --pu_split=easy_hard: weight of the squared difference between the model's and the base's block_group1 outputs on the hard images; 0 allows a base of another architecture.")
# --- Meta Pseudo Labels (--train_mode=mpl)
flags.DEFINE_bool("mpl_self", _d.mpl.mpl_self, "mpl: Self Meta Pseudo Labels: the model is its own teacher (one model in memory); false: a separate teacher model (checkpointed as mpl_teacher).")
flags.DEFINE_float("mpl_student_lr", _d.mpl.mpl_student_lr, "mpl: learning rate of the virtual SGD step of the student whose labeled loss before and after gives the teacher's reward. Not given: the optimizer's learning rate at that step.")
flags.DEFINE_float("mpl_uda_weight", _d.mpl.mpl_uda_weight, "mpl: weight of the teacher's UDA consistency term (--uda_temperature, --uda_confidence, --tsa apply); 0: none.")
flags.DEFINE_enum("mpl_pseudo_labels", _d.mpl.mpl_pseudo_labels, list(config_lib.MPL_PSEUDO_LABELS), "mpl: the student's hard label on a strong view: the teacher's argmax, or a sample of its softmax (the paper's).")
# --- Noisy Student (--train_mode=noisy_student)
flags.DEFINE_integer("iterations", _d.noisy_student.iterations, "noisy_student: teacher -> student rounds, each in <model_dir>/round_<i>; the student of a round teaches the next.")
flags.DEFINE_enum("pseudo_label_type", _d.noisy_student.pseudo_label_type, list(config_lib.PSEUDO_LABEL_TYPES), "noisy_student: the targets of the pseudo-labelled images: soft (the teacher's class probabilities) or hard (one-hot of its argmax).")
flags.DEFINE_integer("noisy_student_per_class", _d.noisy_student.noisy_student_per_class, "noisy_student: pseudo-labelled images per class after balancing (a class with fewer has its images duplicated, one with more keeps its most confident); 0 = the mean count per class of those above --pseudo_label_threshold.")
# --- runtime
flags.DEFINE_string("master", _d.runtime.master, "Address/name of the TensorFlow master (TPU) when --tpu_name is not given.")
flags.DEFINE_bool("use_tpu", _d.runtime.use_tpu, "Whether to run on TPU.")
flags.DEFINE_string("tpu_name", _d.runtime.tpu_name, "The Cloud TPU to use: its name or a grpc://ip:8470 url.")
flags.DEFINE_string("tpu_zone", _d.runtime.tpu_zone, "GCE zone of the Cloud TPU (detected from metadata if unset).")
flags.DEFINE_string("gcp_project", _d.runtime.gcp_project, "GCP project of the Cloud TPU (detected from metadata if unset).")
flags.DEFINE_enum("strategy", _d.runtime.strategy, list(config_lib.STRATEGIES), "tf.distribute strategy. auto: tpu with --use_tpu, multi_worker when the TF_CONFIG environment variable lists several tasks, mirrored with GPUs, else default (one device).")
flags.DEFINE_enum("precision", _d.runtime.precision, list(config_lib.PRECISIONS), "Model dtype policy: float32, mixed_bfloat16 (TPU; CPUs with AVX512-BF16/AMX) or mixed_float16 (GPU, with dynamic loss scaling). Losses are always computed in float32.")
flags.DEFINE_bool("jit_compile", _d.runtime.jit_compile, "Compile the training step with XLA (helps on TPU/GPU; on a CPU it was slower in a quick probe).")
# --- objective
flags.DEFINE_float("temperature", _d.train.temperature, "Temperature parameter for the contrastive loss.")
flags.DEFINE_bool("hidden_norm", _d.train.hidden_norm, "L2-normalise the projections before the contrastive loss.")
# --- model
flags.DEFINE_enum("proj_head_mode", _d.model.proj_head_mode, list(config_lib.PROJ_HEAD_MODES), "How the head projection is done.")
flags.DEFINE_integer("proj_out_dim", _d.model.proj_out_dim, "Output dimension of the projection head.")
flags.DEFINE_integer("num_proj_layers", _d.model.num_proj_layers, "Number of layers of the nonlinear projection head.")
flags.DEFINE_integer("ft_proj_selector", _d.model.ft_proj_selector, "Projection-head layer whose output feeds the supervised head: 0 = no projection layer (backbone features), k = after the first k layers, -1 = the last layer.")
flags.DEFINE_bool("global_bn", _d.model.global_bn, "Aggregate batch-norm statistics across replicas.")
flags.DEFINE_float("width_multiplier", _d.model.width_multiplier, "Width multiplier of the ResNet: 1, 2, 3, ... or 0.25 / 0.5 for small runs.")
flags.DEFINE_integer("resnet_depth", _d.model.resnet_depth, "Depth of the ResNet: 18, 34, 50, 101, 152 or 200 (the original's), or 10 (one basic block per group).")
flags.DEFINE_float("sk_ratio", _d.model.sk_ratio, "If bigger than 0, use selective kernels. Recommendation: 0.0625.")
flags.DEFINE_float("se_ratio", _d.model.se_ratio, "If bigger than 0, use squeeze-and-excitation.")
flags.DEFINE_float("batch_norm_decay", _d.model.batch_norm_decay, "Batch norm decay (moving-average momentum).")
flags.DEFINE_float("dropout_rate", _d.model.dropout_rate, "Dropout on the classifier's input in training (Noisy Student's student noise). Not in the original.")
flags.DEFINE_float("stochastic_depth_rate", _d.model.stochastic_depth_rate, "Stochastic depth in training: the last residual block's branch is dropped per example with this probability, earlier blocks linearly less, the stem never. Not in the original.")
flags.DEFINE_enum("backbone", _d.model.backbone, list(config_lib.BACKBONES), "resnet (the original's, sized by --resnet_depth, --width_multiplier, --sk_ratio) or vit (a Vision Transformer sized by --vit_size and --patch_size). Not in the original.")
flags.DEFINE_enum("vit_size", _d.model.vit_size, list(config_lib.VIT_SIZES), "ViT size (--backbone=vit): tiny (DeiT-Ti, 5.5M parameters), small (DeiT-S, 22M) or base (ViT-B, 86M).")
flags.DEFINE_integer("patch_size", _d.model.patch_size, "ViT patch side in pixels (--backbone=vit): 16 for 224 px images, 4 for 32 px; must divide --image_size.")
flags.DEFINE_enum("vit_pooling", _d.model.vit_pooling, list(config_lib.VIT_POOLINGS), "ViT representation (--backbone=vit): the class token, or the mean of the patch tokens.")

# --- flags only the original's TF1 run.py has (its top-level README's commands pass them)
flags.DEFINE_string("variable_schema", None, "TF1 run.py only, accepted and not used: --checkpoint restores the model's weights only (no step, no optimizer slots), every variable it holds with a matching shape, and logs the list.")
flags.DEFINE_integer("train_summary_steps", None, "TF1 run.py only: N > 0 sets --log_every_steps=N (unless given); 0 (no training summaries) cannot be honoured: scalars are written every --log_every_steps.")

for _section in config_lib.DEMO_DEFAULTS.values():
    for _name, _value in _section.items():
        FLAGS[_name].help += f" Demo default: {_value}."


def runs_demo(flag_values: flags.FlagValues = FLAGS) -> bool:
    """Whether DEMO_DEFAULTS apply: --dataset not given, or given as the embedded demo data.

    The original has no mnist5k, so no command of its READMEs is affected, and its
    ImageNet defaults (a ResNet-50 at 224 px, batch 512) make no sense for 4,000 digits.
    """
    dataset = flag_values["dataset"]
    return not dataset.present or dataset.value == config_lib.DEMO_DATASET


def demo_values(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
    """{flag: demo value} for the demo's flags not given on the command line or in a flagfile."""
    if not runs_demo(flag_values):
        return {}
    return {
        name: value
        for section in config_lib.DEMO_DEFAULTS.values()
        for name, value in section.items()
        if not flag_values[name].present
    }


def tf1_values(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
    """{flag: value} of ours that the TF1-only flags given translate to."""
    steps = flag_values["train_summary_steps"]
    if steps.present and steps.value > 0 and not flag_values["log_every_steps"].present:
        return {"log_every_steps": steps.value}
    return {}


def tf1_notes(flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """One line per TF1-only flag given: what it means here, or what replaces it."""
    notes = []
    schema = flag_values["variable_schema"]
    if schema.present:
        notes.append(
            f"--variable_schema={schema.value!r} (TF1 run.py) is not used, and no other pattern can "
            "be: --checkpoint restores the model's weights only (never global_step or optimizer "
            "slots), every variable it holds with the same shape (the backbone must all be there), "
            "and logs the list; --zero_init_logits_layer starts the supervised head at zero, as a "
            "schema excluding 'head' did. Checkpoints of the original: convert them first with "
            "tools/convert_checkpoint.py (the released TF1 ones have TF2 copies under gs://simclr-checkpoints-tf2/)."
        )
    steps = flag_values["train_summary_steps"]
    if steps.present:
        log_every = flag_values["log_every_steps"]
        if steps.value <= 0:
            notes.append(
                f"--train_summary_steps={steps.value} (TF1 run.py: no training summaries) cannot be "
                "honoured: training scalars are always written, every --log_every_steps "
                f"({demo_values(flag_values).get('log_every_steps', log_every.value)} here)."
            )
        elif log_every.present:
            notes.append(
                f"--train_summary_steps={steps.value} (TF1 run.py) is not used: "
                f"--log_every_steps={log_every.value} is given."
            )
        else:
            notes.append(
                f"--train_summary_steps={steps.value} (TF1 run.py) -> --log_every_steps={steps.value}: "
                "log lines and training scalars every that many steps."
            )
    return notes


def demo_note(flag_values: flags.FlagValues = FLAGS) -> str | None:
    """The line saying which demo values were applied; None when none were."""
    applied = demo_values(flag_values)
    if not applied:
        return None
    listed = ", ".join(f"--{name}={value}" for name, value in applied.items())
    if flag_values["dataset"].present:
        return (f"--dataset={config_lib.DEMO_DATASET} is the embedded demo: its defaults for the flags "
                f"not given: {listed}.")
    return (f"--dataset not given: running the embedded demo with {listed}; pass --dataset=... for the "
            "original's defaults (README: Commands from the original SimCLR READMEs).")


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> config_lib.Config:
    """The typed config for the parsed flags, demo defaults and TF1 flags applied."""
    values = {name: flag_values[name].value for name in config_lib.all_field_names()}
    values.update(demo_values(flag_values))
    values.update(tf1_values(flag_values))  # given explicitly, so over the demo's
    sections: dict[str, dict] = {}
    for name, value in values.items():
        sections.setdefault(config_lib.section_of(name), {})[name] = value
    config = config_lib.Config.from_dict(sections)
    config_lib.validate(config)
    return config


def default_model_dir(config: config_lib.Config) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset.split("/")[-1] or "data")
    return os.path.join("runs", f"{config.train.train_mode}_{dataset}")


def our_flag_values(config: config_lib.Config, flag_values: flags.FlagValues = FLAGS) -> dict:
    """Values of the flags this module defines (not absl's own) as the run resolved them
    (`config`'s, demo defaults included), JSON-serialisable."""
    names = [f.name for f in flag_values.get_flags_for_module(__name__)]
    values = {name: flag_values[name].value for name in sorted(names)}
    values.update(config.flat())
    return values


# Keras imports these at import time when they are installed (mlxtend installs them) for
# plotting, scikit-learn wrappers and DataFrame inputs; a run never uses them. Together
# they hold ~160 MB of resident memory. TFDS builders may need pandas or scipy, so they
# are only kept out for datasets that don't go through TFDS.
OPTIONAL_IMPORTS_UNUSED_BY_RUNS = ("matplotlib", "sklearn", "pandas", "scipy")
TFDS_FREE_DATASETS = ("mnist5k", "folder:")


def skip_optional_imports_keras_would_load(dataset: str) -> None:
    """For a non-TFDS `dataset`, makes `import matplotlib` etc. raise ImportError (Keras handles it).

    Call before Keras is imported.
    """
    if not dataset.startswith(TFDS_FREE_DATASETS):
        return
    for name in OPTIONAL_IMPORTS_UNUSED_BY_RUNS:
        if name not in sys.modules:
            sys.modules[name] = None  # the import system's "known missing" marker


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    for note in [demo_note(), *tf1_notes()]:
        if note:
            logging.info(note)
    model_dir = FLAGS.model_dir or default_model_dir(config)
    logging.info("model_dir: %s", model_dir)

    skip_optional_imports_keras_would_load(config.data.dataset)
    # Imported late so that `--help` and flag errors don't wait for TensorFlow.
    import tensorflow as tf

    from simclr_tf.data.sources import bad_image_message
    from simclr_tf.methods.registry import METHODS
    from simclr_tf.train.checkpoints import UnreadableCheckpointError
    from simclr_tf.train.experiment import check_model_dir, write_json
    from simclr_tf.train.preemption import EXIT_CODE, Preempted
    from simclr_tf.train.runner import model_dir_lock_for

    # Soft placement lets summary ops fall back to the host on TPU.
    tf.config.set_soft_device_placement(True)
    # Flag errors found against files, data or devices (config_lib.FlagError) are
    # raised before anything is built; print them as usage errors, not tracebacks.
    try:
        # Before flags.json is written, so another run's model_dir is left untouched.
        check_model_dir(config, model_dir)
        # Taken before flags.json is written, so a second run leaves the first one's alone.
        with model_dir_lock_for(config, model_dir):
            resolved = our_flag_values(config)
            resolved["model_dir"] = model_dir
            write_json(os.path.join(model_dir, "flags.json"), resolved)
            # The train mode's whole run: one train_and_evaluate, or several (Method.run).
            METHODS[config.train.train_mode].run(config, model_dir)
    except config_lib.FlagError as error:
        raise app.UsageError(str(error)) from None
    except UnreadableCheckpointError as error:
        # Every checkpoint of model_dir is damaged: the message lists each and what to do.
        raise SystemExit(f"Error: {error}") from None
    except Preempted:
        # The trainer logged "Preempted (SIGTERM) at step N: saved ...; run the same command to resume".
        raise SystemExit(EXIT_CODE) from None
    except tf.errors.InvalidArgumentError as error:
        # An unreadable image surfaces deep inside tf.data: print its one-line message instead.
        message = bad_image_message(error.message)
        if message is None:
            raise
        raise SystemExit(f"Error: {message}") from None


def run() -> None:
    app.run(main)
