"""Restores that are exact or say exactly what they did."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import ModelConfig
from simclr_tf.models import build_model
from simclr_tf.optim import build_optimizer
from simclr_tf.train import checkpoints

TINY = ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=32, num_proj_layers=3)


def _model(config=TINY, num_classes=10, **kwargs):
    return build_model(config, num_classes=num_classes, **kwargs)


def _randomized(model, seed):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return model


def _save_training_checkpoint(model, directory):
    optimizer = build_optimizer("lars", learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    manager = checkpoints.make_manager(model, optimizer, str(directory), max_to_keep=2)
    return manager.save(checkpoint_number=7)


def test_every_variable_of_a_training_checkpoint_is_found_by_object_path(tmp_path):
    # The optimizer also references the trainable variables, so TF names many tensors
    # "optimizer/_trainable_variables/N"; matching must go through the object graph.
    model = _randomized(_model(), 0)
    path = _save_training_checkpoint(model, tmp_path)
    stored = checkpoints.checkpoint_variables_by_path(path)
    ours = checkpoints.model_variables_by_path(model)
    assert set(stored) == set(ours) and len(ours) == len(model.weights)
    assert any(key.startswith("optimizer/") for key, _ in stored.values())


def test_exact_restore_copies_every_value(tmp_path):
    source = _randomized(_model(), 1)
    path = _save_training_checkpoint(source, tmp_path)
    target = _model()
    match = checkpoints.restore_model_weights(target, path, exact=True)
    assert match.exact and len(match.restored) == len(target.weights)
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_finetune_init_reports_restored_new_and_unused(tmp_path):
    pretrained = _randomized(_model(num_classes=10), 2)
    path = _save_training_checkpoint(pretrained, tmp_path)
    # Keeps 1 of 3 projection layers, and a 5-class head of a different shape.
    finetune = _model(
        dataclasses.replace(TINY, ft_proj_selector=1), num_classes=5,
        drop_unused_projection_layers=True,
    )
    with pytest.raises(checkpoints.CheckpointMismatchError, match="supervised_head"):
        checkpoints.restore_model_weights(finetune, path, exact=False)

    finetune = _model(dataclasses.replace(TINY, ft_proj_selector=1), num_classes=None,
                      drop_unused_projection_layers=True)
    match = checkpoints.restore_model_weights(finetune, path, exact=False)
    assert not match.missing and not match.mismatched
    assert {p.split("/")[3] for p in match.unused if "linear_layers" in p} == {"1", "2"}
    assert any("supervised_head" in p for p in match.unused)
    summary = checkpoints.summarize(match)
    assert "backbone" in summary and "projection_head/linear_layers/2" in summary


def test_missing_backbone_variables_fail(tmp_path):
    small = _randomized(_model(), 3)
    path = _save_training_checkpoint(small, tmp_path)
    deeper = _model(dataclasses.replace(TINY, resnet_depth=34))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="missing from the checkpoint"):
        checkpoints.restore_model_weights(deeper, path, exact=False)
    before = [v.numpy().copy() for v in deeper.weights]
    # Nothing was assigned before the error.
    for a, b in zip(before, deeper.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_resuming_into_another_architecture_fails_with_the_list(tmp_path):
    _save_training_checkpoint(_randomized(_model(), 4), tmp_path)
    wider = _model(dataclasses.replace(TINY, width_multiplier=0.5))
    optimizer = build_optimizer("lars", learning_rate=0.1)
    optimizer.build(wider.trainable_variables)
    manager = checkpoints.make_manager(wider, optimizer, str(tmp_path), max_to_keep=2)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="different shape"):
        checkpoints.restore(manager, init_checkpoint=None)


def test_resolve_checkpoint_path(tmp_path):
    path = _save_training_checkpoint(_model(), tmp_path)
    assert checkpoints.resolve_checkpoint_path(str(tmp_path)) == path
    assert checkpoints.resolve_checkpoint_path(path) == path
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        checkpoints.resolve_checkpoint_path(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without a checkpoint"):
        checkpoints.resolve_checkpoint_path(str(tmp_path / "empty"))


def test_zero_init_logits_layer_after_restore(tmp_path):
    path = _save_training_checkpoint(_randomized(_model(), 5), tmp_path / "pre")
    model = _model()
    optimizer = build_optimizer("momentum", learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    manager = checkpoints.make_manager(model, optimizer, str(tmp_path / "ft"), max_to_keep=1)
    report = checkpoints.restore(manager, init_checkpoint=path, zero_init_logits_layer=True)
    assert report.source == "checkpoint"
    assert all(not np.any(v.numpy()) for v in model.supervised_head.trainable_weights)
    assert np.any(model.backbone.trainable_weights[0].numpy())
    assert tf.train.latest_checkpoint(str(tmp_path / "ft")) is None


def test_architecture_mismatch_lists_names_and_shapes(tmp_path):
    path = _save_training_checkpoint(_randomized(_model(), 6), tmp_path)
    wider = _model(dataclasses.replace(TINY, width_multiplier=0.5))
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        checkpoints.restore_model_weights(wider, path, exact=True)
    ours = checkpoints.model_variables_by_path(wider)
    theirs = checkpoints.checkpoint_variables_by_path(path)
    stem = next(p for p in ours if p.startswith("model/backbone/") and len(ours[p].shape) == 4)
    assert f"{stem}: model {list(ours[stem].shape)} vs checkpoint {theirs[stem][1]}" in str(error.value)

    deeper = _model(dataclasses.replace(TINY, resnet_depth=34))
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        checkpoints.restore_model_weights(deeper, path, exact=False)
    message = str(error.value)
    assert "under model/backbone/ would not be restored" in message
    match = checkpoints.match_variables(deeper, path)
    ours = checkpoints.model_variables_by_path(deeper)
    for name in match.missing[:20]:  # the first 20 are listed, each with its shape
        assert f"  {name} {list(ours[name].shape)}\n" in message + "\n"


def test_finetune_init_logs_every_restored_and_new_variable(tmp_path, caplog):
    path = _save_training_checkpoint(_randomized(_model(num_classes=None), 7), tmp_path / "pre")
    model = _model(dataclasses.replace(TINY, ft_proj_selector=1), num_classes=5,
                   drop_unused_projection_layers=True)
    optimizer = build_optimizer("momentum", learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    manager = checkpoints.make_manager(model, optimizer, str(tmp_path / "ft"), max_to_keep=1)
    with caplog.at_level("INFO", logger="absl"):
        report = checkpoints.restore(manager, init_checkpoint=path)
    log = caplog.text
    match = report.match
    assert match.missing and all("supervised_head" in name for name in match.missing)
    assert len(match.restored) > 50 and match.unused
    assert f"{len(match.restored)} restored:" in log and f"{len(match.missing)} missing from the checkpoint:" in log
    shapes = checkpoints.model_variables_by_path(model)
    for name in match.restored + match.missing:
        assert f"  {name} {list(shapes[name].shape)}\n" in log, name
