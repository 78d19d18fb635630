"""build_optimizer: the right Keras optimizer with the original's settings."""

import keras
import pytest

from simclr_tf.optim import LARS, LARS_EXCLUDE, WarmUpAndCosineDecay, build_optimizer


def test_lars():
    schedule = WarmUpAndCosineDecay(0.3, 512, "linear", warmup_steps=2, total_steps=20)
    opt = build_optimizer("lars", learning_rate=schedule, momentum=0.8, weight_decay=1e-4)
    assert isinstance(opt, LARS)
    config = opt.get_config()
    assert config["momentum"] == 0.8 and config["weight_decay"] == 1e-4
    assert not config["nesterov"] and config["classic_momentum"] and config["eeta"] == 0.001
    # The original's three, and a ViT's layer norms and embeddings (none in a ResNet).
    assert config["exclude_from_weight_decay"] == [
        "batch_norm", "layer_norm", "position_embedding", "class_token", "bias", "head_supervised"]
    assert config["exclude_from_layer_adaptation"] == list(LARS_EXCLUDE)
    assert opt._learning_rate is schedule


def test_momentum_is_nesterov_sgd_without_decay():
    opt = build_optimizer("momentum", learning_rate=0.5, momentum=0.7, weight_decay=1e-4)
    assert type(opt) is keras.optimizers.SGD
    assert opt.nesterov and opt.momentum == 0.7
    assert opt.weight_decay is None  # The L2 term is in the loss for SGD.
    assert float(opt.learning_rate) == pytest.approx(0.5)


def test_adam_without_decay():
    opt = build_optimizer("adam", learning_rate=1, momentum=0.9, weight_decay=1e-4)  # int rate accepted
    assert type(opt) is keras.optimizers.Adam
    assert opt.weight_decay is None
    assert float(opt.learning_rate) == pytest.approx(1.0)


def test_adamw_decays_in_the_optimizer():
    opt = build_optimizer("adamw", learning_rate=0.01, momentum=0.9, weight_decay=0.05)
    assert type(opt) is keras.optimizers.AdamW
    assert opt.weight_decay == pytest.approx(0.05)


def test_unknown_name():
    with pytest.raises(ValueError, match="--optimizer.*'rmsprop'"):
        build_optimizer("rmsprop", learning_rate=0.1)
