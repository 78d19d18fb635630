"""What a run is made of: data source, derived step counts, the method, datasets.

`Experiment.create(config, model_dir)` resolves everything that depends on the data
(example counts, steps, classes) once, so train, eval and tests share one view of it.
What differs between train modes (model, batches, loss, extra state) is the method's
(`simclr_tf.methods`); this module holds what they share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import TYPE_CHECKING

from absl import logging
import keras
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf import models
from simclr_tf.config import Config, FlagError, ModelConfig
from simclr_tf.distribute import build_strategy
from simclr_tf.train import checkpoints

if TYPE_CHECKING:
    from simclr_tf.methods.base import Method


@dataclasses.dataclass
class Experiment:
    config: Config
    model_dir: str
    strategy: tf.distribute.Strategy
    source: data_lib.Source
    num_train_examples: int
    num_eval_examples: int
    train_steps: int
    warmup_steps: int
    checkpoint_steps: int
    method: "Method" = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        from simclr_tf.methods.registry import METHODS  # methods import this module

        self.method = METHODS[self.config.train.train_mode](self)

    @classmethod
    def create(
        cls, config: Config, model_dir: str, strategy: tf.distribute.Strategy | None = None
    ) -> "Experiment":
        # Every check of flags against files, data and devices comes before anything
        # is built, and raises FlagError (the CLI prints it without a traceback).
        config_lib.validate(config)
        check_model_dir(config, model_dir)
        train_mode = config.train.train_mode
        resuming = tf.train.latest_checkpoint(model_dir) is not None
        from simclr_tf.methods.registry import METHODS  # methods import this module

        method_class = METHODS[train_mode]
        method_class.check_flags(config, resuming=resuming)
        if config.train.checkpoint and not resuming and config.train.mode != "eval":
            with _as_flag_error("checkpoint"):
                checkpoints.resolve_checkpoint_path(config.train.checkpoint)
        if config.distill.teacher_checkpoint and train_mode == "distill":
            with _as_flag_error("teacher_checkpoint"):
                checkpoints.resolve_checkpoint_path(config.distill.teacher_checkpoint, flag="teacher_checkpoint")
        strategy = strategy or build_strategy(config.runtime)
        with _as_flag_error("dataset"):
            source = data_lib.get_source(
                config.data.dataset, config.data.data_dir, skip_bad_images=config.data.skip_bad_images
            )
        subset = labeled_subset(config) if method_class.epochs_over_labeled_subset else None
        with _as_flag_error("train_split"):
            num_train = source.num_examples(config.data.train_split, labeled_subset=subset)
        with _as_flag_error("eval_split"):
            num_eval = source.num_examples(config.data.eval_split)
        bank_size = config.train.knn_bank_size
        if 0 < bank_size < source.num_classes:
            raise FlagError(
                f"--knn_bank_size={bank_size} is fewer than the {source.num_classes} classes: "
                f"use at least {source.num_classes} (one example per class), or 0 for the whole train split."
            )
        replicas = strategy.num_replicas_in_sync
        for flag in ("train_batch_size", "eval_batch_size"):
            if getattr(config.train, flag) % replicas:
                raise FlagError(
                    f"--{flag}={getattr(config.train, flag)} is not divisible by the "
                    f"{replicas} replicas; pick a multiple of {replicas}."
                )
        per_step = method_class.examples_per_step(config)
        train_steps = config_lib.train_steps_for(config, num_train, per_step)
        warmup_steps = config_lib.warmup_steps_for(config, num_train, per_step)
        if warmup_steps > train_steps:
            logging.warning(
                "--warmup_epochs=%s gives %d warm-up steps, more than the %d train steps; "
                "warming up over the whole run instead.",
                config.optim.warmup_epochs, warmup_steps, train_steps,
            )
            warmup_steps = train_steps
        experiment = cls(
            config=config,
            model_dir=model_dir,
            strategy=strategy,
            source=source,
            num_train_examples=num_train,
            num_eval_examples=num_eval,
            train_steps=train_steps,
            warmup_steps=warmup_steps,
            checkpoint_steps=config_lib.checkpoint_steps_for(config, num_train, per_step),
        )
        logging.info(
            "%s on %s: %d train examples (%s%s), %d eval examples (%s), %d classes; "
            "%d train steps (%d warm-up), checkpoint every %d, %d replica(s)",
            train_mode,
            source.name,
            num_train,
            config.data.train_split,
            "" if subset is None or subset.is_everything else ", labeled subset",
            num_eval,
            config.data.eval_split,
            source.num_classes,
            train_steps,
            warmup_steps,
            experiment.checkpoint_steps,
            replicas,
        )
        return experiment

    @property
    def train_mode(self) -> str:
        return self.config.train.train_mode

    @property
    def pretraining(self) -> bool:
        return self.train_mode == "pretrain"

    def build_model(self) -> keras.Model:
        """The trained model for this mode, built; call under the strategy scope."""
        return self.method.build_model()

    def build_classifier(self) -> keras.Model:
        """The fine-tuning model: projection layers up to --ft_proj_selector and the classifier."""
        return self.build(
            self.config.model,
            num_classes=self.source.num_classes,
            stop_gradient_to_supervised_head=False,
            # Fine-tuned models keep the projection layers below the classifier only.
            drop_unused_projection_layers=True,
        )

    def build(
        self,
        model_config: ModelConfig,
        *,
        num_classes: int | None,
        stop_gradient_to_supervised_head: bool,
        drop_unused_projection_layers: bool,
    ) -> keras.Model:
        """A model of this run's strategy and precision; call under the strategy scope."""
        return models.build_model(
            model_config,
            num_classes=num_classes,
            stop_gradient_to_supervised_head=stop_gradient_to_supervised_head,
            drop_unused_projection_layers=drop_unused_projection_layers,
            # Synchronising a single replica's statistics only costs time.
            global_bn=model_config.global_bn and self.strategy.num_replicas_in_sync > 1,
            dtype=self.config.runtime.precision,
        )

    def train_dataset(self, start_step: int = 0) -> tf.distribute.DistributedDataset:
        """Training batches; `start_step` > 0 continues the data where a run stopped at that step."""
        global_batch = self.config.train.train_batch_size

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            batch_size = context.get_per_replica_batch_size(global_batch)
            return self.replica_train_dataset(batch_size, context, start_step=start_step)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def replica_train_dataset(
        self,
        batch_size: int,
        context: tf.distribute.InputContext | None = None,
        start_step: int = 0,
        cache: bool | None = None,
    ) -> tf.data.Dataset:
        """One replica's training batches, as this mode's step expects them.

        `batch_size` is this replica's share of --train_batch_size; `cache` overrides
        `--cache_dataset` (None keeps it).
        """
        cache = self.config.data.cache_dataset if cache is None else cache
        return self.method.train_batches(batch_size, context, start_step=start_step, cache=cache)

    def training_batches(
        self,
        batch_size: int,
        context: tf.distribute.InputContext | None,
        *,
        num_views: int = 1,
        color_jitter_strength: float = 0.0,
        use_blur: bool = False,
        view_fns: tuple | None = None,
        subset: data_lib.LabeledSubset | None = None,
        start_example: int = 0,
        cache: bool,
        source: data_lib.Source | None = None,
    ) -> tf.data.Dataset:
        """Batches of the train split (or its labeled `subset`) for one input pipeline.

        Crop and flip only unless told otherwise (fine-tuning and distillation augment so,
        as the paper); `view_fns` replace SimCLR's augmentation (see `data.build_dataset`).
        `source` replaces the run's (e.g. a method's selection of the train split's examples).
        """
        cfg = self.config
        return data_lib.build_dataset(
            source or self.source,
            split=cfg.data.train_split,
            batch_size=batch_size,
            is_training=True,
            num_views=num_views,
            image_size=cfg.model.image_size,
            color_jitter_strength=color_jitter_strength,
            use_blur=use_blur,
            use_flip=cfg.data.use_flip,
            crop_min_area=cfg.data.crop_min_area,
            affine=data_lib.Affine(
                cfg.data.affine_rotation_degrees, cfg.data.affine_scale_change, cfg.data.affine_shift
            ),
            view_fns=view_fns,
            cache=cache,
            input_context=context,
            shuffle_seed=cfg.train.seed,
            labeled_subset=subset,
            start_example=start_example,
        )

    def eval_dataset(
        self, split: str, labeled_subset: data_lib.LabeledSubset | None = None
    ) -> tf.distribute.DistributedDataset:
        """One ordered pass over `split` (or over its `labeled_subset`), eval preprocessing."""
        cfg = self.config

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return data_lib.build_dataset(
                self.source,
                split=split,
                batch_size=context.get_per_replica_batch_size(cfg.train.eval_batch_size),
                is_training=False,
                num_views=1,
                image_size=cfg.model.image_size,
                color_jitter_strength=0.0,
                use_blur=False,
                cache=False,
                input_context=context,
                labeled_subset=labeled_subset,
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def augmented_examples(self, count: int = 4) -> tf.Tensor:
        """A few training inputs as the model sees them, views side by side: (count*views, H, W, 3)."""
        # Without the cache: a cached epoch starts only once the whole split is decoded.
        return self.method.preview_images(next(iter(self.replica_train_dataset(count, cache=False))), count)


def labeled_subset(config: Config) -> data_lib.LabeledSubset:
    d = config.data
    return data_lib.LabeledSubset(
        fraction=d.labeled_fraction, per_class=d.labeled_per_class, seed=d.labeled_seed
    )


TEACHER_FIELDS = (
    "resnet_depth",
    "width_multiplier",
    "sk_ratio",
    "se_ratio",
    "proj_head_mode",
    "num_proj_layers",
    "proj_out_dim",
    "ft_proj_selector",
)


# The teacher's backbone family and ViT size come from its run's config.json only (no
# --teacher_* flags): a ViT teacher can teach a ResNet student and the other way round.
TEACHER_SAVED_FIELDS = ("backbone", "vit_size", "patch_size", "vit_pooling")


def teacher_model_config(config: Config) -> ModelConfig:
    """The teacher's architecture: --teacher_* flags, else its run's config.json, else the student's."""
    base = config.model
    saved = read_saved_model_config(config.distill.teacher_checkpoint)
    fields = (*TEACHER_FIELDS, *TEACHER_SAVED_FIELDS)
    base = dataclasses.replace(base, **{f: saved[f] for f in fields if f in saved})
    overrides = {
        field: getattr(config.distill, f"teacher_{field}")
        for field in TEACHER_FIELDS
        if getattr(config.distill, f"teacher_{field}") is not None
    }
    # The teacher is only evaluated: never frozen in part, whatever the student does.
    return dataclasses.replace(base, **overrides, fine_tune_after_block=-1)


def read_saved_model_config(checkpoint: str | None) -> dict:
    """The "model" section of the config.json `save_config` wrote next to a checkpoint ({} if none)."""
    return read_saved_config(checkpoint).get("model", {})


def read_saved_config(checkpoint: str | None) -> dict:
    """The config.json `save_config` wrote next to a checkpoint (or in a model_dir); {} if none."""
    if not checkpoint:
        return {}
    directory = checkpoint if tf.io.gfile.isdir(checkpoint) else os.path.dirname(checkpoint)
    path = os.path.join(directory, "config.json")
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def check_model_dir(config: Config, model_dir: str) -> None:
    """Raises FlagError if `model_dir` is not writable, or holds checkpoints of another run.

    "Another run" is one whose config.json differs in the train mode or in a flag that
    decides the model's variables: resuming it would fail in the restore, or worse,
    silently continue a different experiment.
    """
    try:
        tf.io.gfile.makedirs(model_dir)
        probe = os.path.join(model_dir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as error:
        raise FlagError(
            f"--model_dir={model_dir}: cannot write there ({error}). Pass a writable directory."
        ) from None
    if tf.train.latest_checkpoint(model_dir) is None:
        return
    saved = read_saved_config(model_dir)
    if not saved:
        return  # written by something else; the restore itself still checks every variable
    ours = config.to_dict()
    pairs = [("train_mode", saved.get("train", {}).get("train_mode"), config.train.train_mode)]
    pairs += [(f, saved.get("model", {}).get(f), ours["model"][f])
              for f in (*TEACHER_FIELDS, *TEACHER_SAVED_FIELDS)]
    # The image size decides the stem's variables only through `cifar_stem`.
    saved_size = saved.get("model", {}).get("image_size")
    if saved_size is not None and (saved_size <= 32) != config.model.cifar_stem:
        pairs.append(("image_size", saved_size, config.model.image_size))
    differences = [f"--{flag}={theirs} there, {mine} here" for flag, theirs, mine in pairs
                   if theirs is not None and theirs != mine]
    if differences:
        raise FlagError(
            f"--model_dir={model_dir} holds checkpoints of another run ({'; '.join(differences)}). "
            "Use a new --model_dir, or that run's flags to resume it."
        )


@contextlib.contextmanager
def _as_flag_error(flag: str):
    """Re-raises a bad value's ValueError/FileNotFoundError as a FlagError naming `flag`."""
    try:
        yield
    except FlagError:
        raise
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        raise FlagError(message if message.startswith(f"--{flag}") else f"--{flag}: {message}") from None


def write_json(path: str, values: dict) -> None:
    """Writes atomically so a crash never leaves a half-written file."""
    # Per process: the workers of a multi-worker run may write the same file at once.
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def save_config(config: Config, model_dir: str) -> None:
    tf.io.gfile.makedirs(model_dir)
    write_json(os.path.join(model_dir, "config.json"), config.to_dict())
