"""Input pipeline: dataset sources, SimCLR augmentations and batched views."""

from simclr_tf.data.augment import Affine, preprocess_for_eval, preprocess_for_train
from simclr_tf.data.pipeline import build_dataset
from simclr_tf.data.sources import (
    FolderSource,
    LabeledSubset,
    Mnist5kSource,
    Source,
    SplitSpec,
    TfdsSource,
    get_source,
    labeled_subset_indices,
    parse_split,
    select_indices,
)

__all__ = [
    "Affine",
    "FolderSource",
    "LabeledSubset",
    "Mnist5kSource",
    "Source",
    "SplitSpec",
    "TfdsSource",
    "build_dataset",
    "get_source",
    "labeled_subset_indices",
    "parse_split",
    "preprocess_for_eval",
    "preprocess_for_train",
    "select_indices",
]
