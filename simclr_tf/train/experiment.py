"""What a run is made of: data source, derived step counts, model, datasets.

`Experiment.create(config, model_dir)` resolves everything that depends on the data
(example counts, steps, classes) once, so train, eval and tests share one view of it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import keras
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import data as data_lib
from simclr_tf import models
from simclr_tf.config import Config
from simclr_tf.distribute import build_strategy
from simclr_tf.train import steps as steps_lib


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

    @classmethod
    def create(
        cls, config: Config, model_dir: str, strategy: tf.distribute.Strategy | None = None
    ) -> "Experiment":
        strategy = strategy or build_strategy(config.runtime)
        source = data_lib.get_source(config.data.dataset, config.data.data_dir)
        num_train = source.num_examples(config.data.train_split)
        num_eval = source.num_examples(config.data.eval_split)
        replicas = strategy.num_replicas_in_sync
        for flag in ("train_batch_size", "eval_batch_size"):
            if getattr(config.train, flag) % replicas:
                raise ValueError(
                    f"--{flag}={getattr(config.train, flag)} is not divisible by the "
                    f"{replicas} replicas; pick a multiple of {replicas}."
                )
        train_steps = config_lib.train_steps_for(config, num_train)
        warmup_steps = config_lib.warmup_steps_for(config, num_train)
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
            checkpoint_steps=config_lib.checkpoint_steps_for(config, num_train),
        )
        logging.info(
            "Dataset %s: %d train examples (%s), %d eval examples (%s), %d classes; "
            "%d train steps (%d warm-up), checkpoint every %d, %d replica(s)",
            source.name,
            num_train,
            config.data.train_split,
            num_eval,
            config.data.eval_split,
            source.num_classes,
            experiment.train_steps,
            experiment.warmup_steps,
            experiment.checkpoint_steps,
            replicas,
        )
        return experiment

    @property
    def train_mode(self) -> str:
        return self.config.train.train_mode

    def has_supervised_head(self) -> bool:
        return self.train_mode != "pretrain" or self.config.train.lineareval_while_pretraining

    def build_model(self) -> keras.Model:
        """The model for this train mode, built (variables created); call under the strategy scope."""
        cfg = self.config
        model = models.build_model(
            cfg.model,
            num_classes=self.source.num_classes if self.has_supervised_head() else None,
            # Linear eval while pretraining must not shape the representation.
            stop_gradient_to_supervised_head=self.train_mode == "pretrain",
            # Synchronising a single replica's statistics only costs time.
            global_bn=cfg.model.global_bn and self.strategy.num_replicas_in_sync > 1,
        )
        size = cfg.model.image_size
        model(tf.zeros([1, size, size, 3]), training=False)
        return model

    def loss_fn(self) -> steps_lib.LossFn:
        if self.train_mode == "pretrain":
            return steps_lib.PretrainLoss(
                temperature=self.config.train.temperature, hidden_norm=self.config.train.hidden_norm
            )
        if self.train_mode == "finetune":
            return steps_lib.FinetuneLoss()
        raise ValueError(f"--train_mode={self.train_mode} is not supported yet")

    def train_dataset(self, per_replica_batch_size: int | None = None) -> tf.distribute.DistributedDataset:
        cfg = self.config
        pretraining = self.train_mode == "pretrain"

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return data_lib.build_dataset(
                self.source,
                split=cfg.data.train_split,
                batch_size=per_replica_batch_size
                or context.get_per_replica_batch_size(cfg.train.train_batch_size),
                is_training=True,
                num_views=2 if pretraining else 1,
                image_size=cfg.model.image_size,
                # Fine-tuning augments with crop and flip only, as the paper.
                color_jitter_strength=cfg.data.color_jitter_strength if pretraining else 0.0,
                use_blur=cfg.data.use_blur and pretraining,
                cache=cfg.data.cache_dataset,
                input_context=context,
                shuffle_seed=cfg.train.seed,
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def eval_dataset(self, split: str) -> tf.distribute.DistributedDataset:
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
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def augmented_examples(self, count: int = 4) -> tf.Tensor:
        """A few training inputs as the model sees them, views side by side: (count*views, H, W, 3)."""
        cfg = self.config
        pretraining = self.train_mode == "pretrain"
        dataset = data_lib.build_dataset(
            self.source,
            split=cfg.data.train_split,
            batch_size=count,
            is_training=True,
            num_views=2 if pretraining else 1,
            image_size=cfg.model.image_size,
            color_jitter_strength=cfg.data.color_jitter_strength if pretraining else 0.0,
            use_blur=cfg.data.use_blur and pretraining,
            cache=False,
        )
        images = next(iter(dataset))["image"]  # (views*count, H, W, 3), view-major
        views = images.shape[0] // count
        # Interleave so each example's views are neighbours: (count, views, H, W, 3).
        images = tf.reshape(images, [views, count, *images.shape[1:]])
        return tf.reshape(tf.transpose(images, [1, 0, 2, 3, 4]), [-1, *images.shape[2:]])


def write_json(path: str, values: dict) -> None:
    """Writes atomically so a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def save_config(config: Config, model_dir: str) -> None:
    tf.io.gfile.makedirs(model_dir)
    write_json(os.path.join(model_dir, "config.json"), config.to_dict())
