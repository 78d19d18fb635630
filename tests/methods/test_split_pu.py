"""`--train_mode=pu --pu_split=easy_hard` (Split-PU): losses against NumPy, the split rule, the staged run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import FlagError, validate
from simclr_tf.methods import split_pu
from simclr_tf.methods.registry import METHODS
from simclr_tf.train import train_and_evaluate, trainer
from simclr_tf.train.experiment import Experiment


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0), axis=-1)


def _gjs(targets, logits, pi):
    p = _softmax(np.asarray(logits, np.float64))
    m = pi * targets + (1 - pi) * p
    return (pi * _kl(targets, m) + (1 - pi) * _kl(p, m)) / (-(1 - pi) * np.log(1 - pi))


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _bce(target, logit):
    return -(target * np.log(_sigmoid(logit)) + (1 - target) * np.log(_sigmoid(-logit)))


# --------------------------------------------------------------------------- losses


def test_generalized_js_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(3), size=6)
    targets[0] = [1.0, 0.0, 0.0]  # one-hot: KL terms with zeros
    loss = split_pu.generalized_js_loss(targets=targets, logits=logits, target_weight=0.7).numpy()
    np.testing.assert_allclose(loss, _gjs(targets, logits, 0.7), rtol=1e-5, atol=1e-7)
    # Zero where the prediction is the target.
    same = split_pu.generalized_js_loss(targets=_softmax(logits), logits=logits, target_weight=0.7).numpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_easy_loss_is_bce_on_positives_and_js_on_easy_over_their_count():
    positive = np.array([0.3, -1.2], np.float32)
    easy, targets = np.array([2.0, -0.5, 0.1], np.float32), np.array([0.9, 0.2, 0.5], np.float32)
    loss, metrics = split_pu.easy_loss(positive_scores=positive, easy_scores=easy, easy_targets=targets,
                                       target_weight=0.7)
    two_class = lambda x: np.stack([1 - x, x], axis=-1)  # noqa: E731
    js = _gjs(two_class(targets.astype(np.float64)), np.stack([np.zeros(3), easy], -1), 0.7)
    expected = (_bce(1.0, positive).sum() + js.sum()) / 5
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["easy_loss"]) == float(loss)
    # With the sets' ratio r: (r mean BCE + mean GJS) / (1 + r), whatever the batch's mix.
    weighted, _ = split_pu.easy_loss(positive_scores=positive, easy_scores=easy, easy_targets=targets,
                                     target_weight=0.7, positive_ratio=0.01)
    np.testing.assert_allclose(float(weighted), (0.01 * _bce(1.0, positive).mean() + js.mean()) / 1.01, rtol=1e-5)


def test_prediction_consistency_keeps_confident_images_either_way():
    # p = sigmoid(weak): 0.98 (kept), 0.02 (kept: the reference would drop it), 0.6 (dropped).
    weak = tf.Variable(np.log(np.array([0.98, 0.02, 0.6]) / (1 - np.array([0.98, 0.02, 0.6]))).astype(np.float32))
    strong = tf.Variable(np.array([0.5, 1.0, -2.0], np.float32))
    with tf.GradientTape() as tape:
        loss, metrics = split_pu.prediction_consistency_loss(weak_scores=weak, strong_scores=strong, threshold=0.95)
    p = _sigmoid(weak.numpy())
    expected = (_bce(p[0], 0.5) + _bce(p[1], 1.0)) / 3  # masked images count 0 in the mean
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mask_rate"]), 2 / 3, rtol=1e-6)
    d_weak, d_strong = tape.gradient(loss, [weak, strong])
    assert d_weak is None  # the weak view is the target only
    np.testing.assert_allclose(d_strong.numpy(), [(_sigmoid(0.5) - p[0]) / 3, (_sigmoid(1.0) - p[1]) / 3, 0.0],
                               rtol=1e-4, atol=1e-7)


def test_simsiam_is_the_symmetric_negative_cosine_with_stopped_features():
    rng = np.random.default_rng(1)
    p1, p2, z1, z2 = (tf.Variable(rng.normal(size=(4, 5)).astype(np.float32)) for _ in range(4))
    with tf.GradientTape() as tape:
        loss = split_pu.simsiam_loss(weak_predictions=p1, strong_predictions=p2, weak_features=z1, strong_features=z2)

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    expected = -0.5 * cos(p1.numpy(), z2.numpy()).mean() - 0.5 * cos(p2.numpy(), z1.numpy()).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    grads = tape.gradient(loss, [p1, p2, z1, z2])
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None


def test_feature_consistency_is_the_mean_squared_difference_to_the_base():
    rng = np.random.default_rng(2)
    student, teacher = (tf.Variable(rng.normal(size=(2, 3, 3, 4)).astype(np.float32)) for _ in range(2))
    with tf.GradientTape() as tape:
        loss = split_pu.feature_consistency_loss(features=student, base_features=teacher)
    np.testing.assert_allclose(float(loss), np.mean((student.numpy() - teacher.numpy()) ** 2), rtol=1e-5)
    assert tape.gradient(loss, teacher) is None


def test_split_pu_loss_weighs_the_hard_terms_and_drops_them_without_hard_images():
    rng = np.random.default_rng(3)
    easy_args = dict(positive_scores=np.array([0.4], np.float32), easy_scores=np.array([1.0, -1.0], np.float32),
                     easy_targets=np.array([0.8, 0.3], np.float32))
    hard = {
        "weak_scores": np.array([4.0, -4.0, 0.0], np.float32), "strong_scores": np.array([1.0, 0.0, 2.0], np.float32),
        **{k: rng.normal(size=(3, 5)).astype(np.float32)
           for k in ("weak_predictions", "strong_predictions", "weak_features", "strong_features")},
        "low_level": rng.normal(size=(6, 2, 2, 3)).astype(np.float32),
        "base_low_level": rng.normal(size=(6, 2, 2, 3)).astype(np.float32),
    }
    easy, _ = split_pu.easy_loss(**easy_args, target_weight=0.7)
    consistency, _ = split_pu.prediction_consistency_loss(weak_scores=hard["weak_scores"],
                                                          strong_scores=hard["strong_scores"], threshold=0.95)
    sim = split_pu.simsiam_loss(**{k: hard[k] for k in ("weak_predictions", "strong_predictions", "weak_features",
                                                        "strong_features")})
    feature = np.mean((hard["low_level"] - hard["base_low_level"]) ** 2)
    weights = dict(hard_weight=0.3, sim_weight=0.1, feature_weight=0.2, target_weight=0.7, threshold=0.95)
    loss, metrics = split_pu.split_pu_loss(**easy_args, hard=hard, **weights)
    np.testing.assert_allclose(float(loss), float(easy) + 0.3 * float(consistency) + 0.1 * float(sim) + 0.2 * feature,
                               rtol=1e-5)
    assert set(metrics) == set(split_pu.FINAL_METRICS)
    without_features = {k: v for k, v in hard.items() if k not in ("low_level", "base_low_level")}
    loss, metrics = split_pu.split_pu_loss(**easy_args, hard=without_features, **weights)
    np.testing.assert_allclose(float(loss), float(easy) + 0.3 * float(consistency) + 0.1 * float(sim), rtol=1e-5)
    assert float(metrics["feature_loss"]) == 0.0
    loss, metrics = split_pu.split_pu_loss(**easy_args, hard=None, **weights)
    np.testing.assert_allclose(float(loss), float(easy), rtol=1e-6)
    assert set(metrics) == set(split_pu.FINAL_METRICS) and float(metrics["sim_loss"]) == 0.0


def test_imitation_is_bce_towards_the_base_0_1_prediction():
    scores, base_scores = np.array([0.5, -2.0, 1.0], np.float32), np.array([3.0, 0.2, -0.1], np.float32)
    loss, metrics = split_pu.imitation_loss(scores=scores, base_scores=base_scores)
    np.testing.assert_allclose(float(loss), np.mean(_bce(np.array([1.0, 1.0, 0.0]), scores)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["base_agreement"]), 1 / 3, rtol=1e-6)


# --------------------------------------------------------------------------- the split


def test_disagreements_are_hard_except_the_base_scores_outside_the_quantiles():
    base = np.array([-3.0, -1.0, -0.5, -0.2, 0.1, 0.4, 2.0, 5.0, 1.0, -2.0, 0.3, -0.1])
    temporary = np.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    # The first 8 disagree. Their base scores sorted: -3, -1, -0.5, -0.2, 0.1, 0.4, 2, 5; the
    # linear 15% quantile sits at position 0.15 * 7 = 1.05: -1 + 0.05 * 0.5 = -0.975, the 85%
    # one at 5.95: 0.4 + 0.95 * 1.6 = 1.92. So -3, -1, 2 and 5 go back to easy; the last 4 agree.
    easy = split_pu.split_easy_hard(base, temporary, quantile=0.15)
    np.testing.assert_array_equal(easy, [True, True, False, False, False, False, True, True] + [True] * 4)
    assert split_pu.split_easy_hard(base, base).all()  # full agreement: all easy
    split = split_pu.Split(easy=easy, base_scores=base.astype(np.float32),
                           temporary_scores=temporary.astype(np.float32),
                           labels=np.array([3, 3, 1, 1, 1, 1, 3, 3, 0, 0, 0, 0]), epochs=2, agreement=4 / 12)
    assert split.stats((3,)) == {
        "examples": 12, "epochs": 2, "agreement": 4 / 12, "disagreeing": 8, "easy": 8, "hard": 4,
        "moved_back_to_easy": 4, "easy_positive_fraction": 4 / 8, "hard_positive_fraction": 0.0,
    }


@pytest.mark.parametrize("batch,easy,hard,expected", [(8, 90, 10, (7, 1)), (8, 50, 50, (4, 4)), (8, 999, 1, (7, 1)),
                                                       (8, 10, 0, (8, 0)), (4, 1, 99, (1, 3))])
def test_unlabeled_batch_sizes_follow_the_parts(batch, easy, hard, expected):
    assert split_pu.unlabeled_batch_sizes(batch, easy, hard) == expected


def test_the_split_file_is_written_atomically(tmp_path, monkeypatch):
    split = split_pu.Split(easy=np.array([True, False]), base_scores=np.array([1.0, -1.0], np.float32),
                           temporary_scores=np.array([1.0, 1.0], np.float32), labels=np.array([3, 4]), epochs=1,
                           agreement=0.5)
    path = str(tmp_path / split_pu.SPLIT_FILE)
    with monkeypatch.context() as patch:
        patch.setattr(split_pu.tf.io.gfile, "rename", _die)
        with pytest.raises(_Killed):
            split.save(path)
    assert not os.path.exists(path)
    split.save(path)
    loaded = split_pu.Split.load(path)
    np.testing.assert_array_equal(loaded.easy, split.easy)
    assert (loaded.epochs, loaded.agreement) == (1, 0.5) and loaded.easy.dtype == bool


# --------------------------------------------------------------------------- runs


def _pu_config(tiny_method_config, **sections):
    config = tiny_method_config(
        "pu", data={"train_split": "train[:32]", "labeled_per_class": 2},
        pu={"positive_classes": "3,5", "pu_prior": 0.2},
    )
    return config.replace(**sections)


_BASE_DIRS: dict[str, str] = {}


@pytest.fixture
def base_dir(tiny_method_config, tmp_path_factory):
    """A one-step nnPU run, the base: trained once per session (this process)."""
    if "base" not in _BASE_DIRS:
        model_dir = str(tmp_path_factory.mktemp("nnpu_base"))
        train_and_evaluate(_pu_config(tiny_method_config), model_dir)
        _BASE_DIRS["base"] = model_dir
    return _BASE_DIRS["base"]


def _split_config(tiny_method_config, base_dir, **pu):
    return _pu_config(tiny_method_config, pu={"pu_split": "easy_hard", "pu_base_checkpoint": base_dir, **pu})


class _Killed(Exception):
    pass


def _die(*args, **kwargs):
    raise _Killed()


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns


def test_one_final_step_against_numpy(tiny_method_config, base_dir, tmp_path, monkeypatch):
    # A fresh model is confident about no image; keep all of them, so the term is not 0.
    monkeypatch.setattr(split_pu, "CONSISTENCY_THRESHOLD", 0.5)
    # A split with both parts: every other image of the 32 is hard.
    base_scores = np.linspace(-2, 2, 32).astype(np.float32)
    split = split_pu.Split(easy=np.arange(32) % 2 == 0, base_scores=base_scores, temporary_scores=-base_scores,
                           labels=np.zeros(32, np.int64), epochs=1, agreement=0.0)
    split.save(str(tmp_path / split_pu.SPLIT_FILE))
    config = _split_config(tiny_method_config, base_dir, pu_split_file=str(tmp_path / split_pu.SPLIT_FILE),
                           pu_hard_weight=0.5, pu_sim_weight=0.25, pu_feature_weight=2.0)
    experiment = Experiment.create(config, str(tmp_path / "final"))
    state = trainer.build_train_state(experiment)
    method = state.method
    assert isinstance(method, split_pu.Final) and method.images_per_step(config) == 8 + 4 + 2 * 4
    assert "simsiam_predictor" in method.checkpoint_items()
    batch = next(iter(experiment.replica_train_dataset(8)))
    assert batch["image"].shape[0] == 8 and batch["easy_image"].shape[0] == 4 and batch["hard_image"].shape[0] == 8
    assert set(batch["label"].numpy()) <= {3, 5}
    model_weights, predictor_weights = state.model.get_weights(), method.predictor.get_weights()
    loss, metrics = method(state.model, batch)
    state.model.set_weights(model_weights)  # batch norm's moving statistics moved in the step
    method.predictor.set_weights(predictor_weights)

    images = tf.concat([batch["image"], batch["easy_image"], batch["hard_image"]], 0)
    outputs = state.model(images, training=True)
    logits = outputs["logits_sup"].numpy().astype(np.float64)
    g = logits[:, 1] - logits[:, 0]
    easy_rows = batch["easy_row"].numpy()  # rows of the easy images 0, 2, 4, ... -> base score of image 2*row
    targets = _sigmoid(base_scores[2 * easy_rows])
    js = _gjs(np.stack([1 - targets, targets], -1), np.stack([np.zeros(4), g[8:12]], -1), 0.7)
    # The two means weighted by the sets' sizes: 2 labeled images of each positive class
    # (labeled_per_class) against the 16 easy images, not the batch's 8 against 4.
    assert method.positive_ratio == 4 / 16
    easy = (0.25 * _bce(1.0, g[:8]).mean() + js.mean()) / 1.25
    weak, strong = g[12:16], g[16:20]
    p = _sigmoid(weak)
    hard = np.mean(_bce(p, strong))
    z = outputs["supervised_head_input"].numpy()[12:]
    pred = method.predictor(z, training=True).numpy()

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    sim = -0.5 * cos(pred[:4], z[4:]).mean() - 0.5 * cos(pred[4:], z[:4]).mean()
    base_low = method.base(batch["hard_image"], training=False)["block_group1"].numpy()
    feature = np.mean((outputs["block_group1"].numpy()[12:] - base_low) ** 2)
    np.testing.assert_allclose(float(metrics["easy_loss"]), easy, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["hard_loss"]), hard, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["sim_loss"]), sim, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["feature_loss"]), feature, rtol=1e-4)
    np.testing.assert_allclose(float(loss), easy + 0.5 * hard + 0.25 * sim + 2.0 * feature, rtol=1e-4)


def test_stages_run_save_the_split_and_resume_after_kills(tiny_method_config, base_dir, tmp_path, monkeypatch):
    config = _split_config(tiny_method_config, base_dir, pu_split_agreement=1.0, pu_split_max_epochs=2)
    # No RandAugment in the strong view: its input pipeline takes seconds to build, twice a run.
    config = config.replace(train={"mode": "train_then_eval", "train_steps": 2, "checkpoint_steps": 1},
                            semi={"randaugment_num_ops": 0})
    run = METHODS["pu"].run
    epochs = [tmp_path / split_pu.SPLIT_DIR / f"epoch_{e}" for e in (1, 2)]
    final = tmp_path / split_pu.FINAL_DIR
    save = trainer.distribute.save_checkpoint

    def dies_after(directory):  # saves the step-1 checkpoint in `directory`, then the process "dies"
        def save_then_die(manager, step, strategy):
            path = save(manager, step, strategy)
            if manager.directory == str(directory) and step == 1:
                raise _Killed()
            return path
        return save_then_die

    # The rule has its own test; fixed here so that both parts exist (a one-step base and its
    # imitation agree on every tiny digit): every fourth image is hard.
    monkeypatch.setattr(split_pu, "split_easy_hard", lambda base, temporary: np.arange(len(base)) % 4 != 0)
    # 1. Killed in the split's second epoch: the first epoch's scores are kept, the second resumes.
    with monkeypatch.context() as patch:
        patch.setattr(trainer.distribute, "save_checkpoint", dies_after(epochs[1]))
        with pytest.raises(_Killed):
            run(config, str(tmp_path))
    assert (epochs[0] / split_pu.EPOCH_SCORES_FILE).exists() and not (epochs[1] / split_pu.EPOCH_SCORES_FILE).exists()
    first_epoch = {p: _digest(p) for p in epochs[0].iterdir() if p.is_file()}
    # 2. Killed in the final stage, after its step-1 checkpoint.
    with monkeypatch.context() as patch:
        patch.setattr(trainer.distribute, "save_checkpoint", dies_after(final))
        with pytest.raises(_Killed):
            run(config, str(tmp_path))
    assert {p: _digest(p) for p in epochs[0].iterdir() if p.is_file()} == first_epoch
    # Agreement 1.0 is never exceeded: both epochs ran, each a run of 32 / 8 = 4 steps, the
    # second from the first's weights.
    for epoch in epochs:
        assert tf.train.latest_checkpoint(str(epoch)).endswith("ckpt-4")
        assert (epoch / split_pu.EPOCH_SCORES_FILE).exists()
    assert json.loads((epochs[1] / "config.json").read_text())["train"]["checkpoint"] == str(epochs[0])
    split_file = tmp_path / split_pu.SPLIT_FILE
    split = split_pu.Split.load(str(split_file))
    assert split.num_examples == 32 and split.epochs == 2
    np.testing.assert_array_equal(split.easy, np.arange(32) % 4 != 0)
    np.testing.assert_array_equal(split.temporary_scores, np.load(epochs[1] / split_pu.EPOCH_SCORES_FILE)["scores"])
    assert json.loads((final / "config.json").read_text())["pu"]["pu_split_file"] == str(split_file)
    assert tf.train.latest_checkpoint(str(final)).endswith("ckpt-1")
    assert not (tmp_path / split_pu.RESULT_FILE).exists()
    before = {p: _digest(p) for p in [split_file, *(e / split_pu.EPOCH_SCORES_FILE for e in epochs)]}

    # 3. The rerun keeps the split (never training the temporary model again) and resumes the final stage.
    result = run(config, str(tmp_path))
    assert {p: _digest(p) for p in before} == before
    assert result["global_step"] == 2 and tf.train.latest_checkpoint(str(final)).endswith("ckpt-2")
    record = json.loads((tmp_path / split_pu.RESULT_FILE).read_text())
    assert record["result"]["eval/label_top_1_accuracy"] == result["eval/label_top_1_accuracy"]
    assert (record["split"]["easy"], record["split"]["hard"], record["split"]["epochs"]) == (24, 8, 2)
    # The final model trained on both parts, the SimSiam predictor checkpointed with it.
    reader = tf.train.load_checkpoint(str(final / "ckpt-2"))
    assert any(name.startswith("simsiam_predictor/") for name in reader.get_variable_to_shape_map())
    assert run(config, str(tmp_path)) == result  # finished: skipped


def test_flag_errors_name_the_flag(tiny_method_config, base_dir, tmp_path):
    # The base's checkpoint, in a run that says it was supervised.
    supervised = tmp_path / "supervised"
    shutil.copytree(base_dir, supervised)
    saved = json.loads((supervised / "config.json").read_text())
    saved["train"]["train_mode"] = "supervised"
    (supervised / "config.json").write_text(json.dumps(saved))
    config = _pu_config(tiny_method_config, pu={"pu_split": "easy_hard"})
    with pytest.raises(FlagError, match="^--pu_base_checkpoint"):
        validate(config)
    for field, value in (("pu_split", "x"), ("pu_split_agreement", 0.0), ("pu_split_max_epochs", 0),
                         ("pu_hard_weight", -1.0), ("pu_sim_weight", float("nan")), ("pu_feature_weight", -0.1)):
        with pytest.raises(FlagError, match=f"^--{field}"):
            validate(config.replace(pu={"pu_base_checkpoint": base_dir, field: value}))
    with pytest.raises(FlagError, match="^--pu_split_file"):
        validate(_pu_config(tiny_method_config, pu={"pu_split_file": "s.npz"}))
    run = METHODS["pu"].run
    for bad, message in ((str(tmp_path / "none"), "no such checkpoint"),
                         (str(supervised), "--train_mode=supervised run")):
        with pytest.raises(FlagError, match=f"^--pu_base_checkpoint.*{message}"):
            run(config.replace(pu={"pu_base_checkpoint": bad}), str(tmp_path / "run"))
    # Also when a stage's run is started on its own: before anything is built.
    with pytest.raises(FlagError, match="^--pu_base_checkpoint"):
        Experiment.create(config.replace(pu={"pu_base_checkpoint": str(supervised)}), str(tmp_path / "stage"))
    wider = config.replace(pu={"pu_base_checkpoint": base_dir}, model={"width_multiplier": 0.5})
    with pytest.raises(FlagError, match="^--pu_base_checkpoint.*width_multiplier"):
        run(wider, str(tmp_path / "run"))
    with pytest.raises(FlagError, match="^--pu_split_file"):
        run(config.replace(pu={"pu_base_checkpoint": base_dir, "pu_split_file": str(tmp_path / "no.npz")}),
            str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # each stopped before anything was built or written
    # Without --pu_split: today's nnPU method.
    assert type(Experiment.create(_pu_config(tiny_method_config), str(tmp_path / "p")).method) is METHODS["pu"]
