"""TensorBoard's HParams table: a row per model_dir with its flags, a column per scalar written."""

import glob
import os
import types

import pytest
import tensorflow as tf
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

from simclr_tf.config import Config
from simclr_tf.train import hparams, train_and_evaluate


def _tiny(**overrides) -> Config:
    """ResNet-10 x0.25 at 16 px on 64 digits, 2 steps of 16, evaluated on 32."""
    config = Config.demo().replace(
        model={"resnet_depth": 10, "image_size": 16, "num_proj_layers": 1, "proj_out_dim": 16},
        data={"train_split": "train[:64]", "eval_split": "validation[:32]"},
        train={"mode": "train_then_eval", "train_steps": 2, "train_batch_size": 16, "eval_batch_size": 32,
               "log_every_steps": 1, "checkpoint_steps": 1, "keep_hub_module_max": 0},
    )
    return config.replace(**overrides)


def _table(logdir) -> tuple[api_pb2.Experiment, dict[str, api_pb2.SessionGroup]]:
    """What `tensorboard --logdir=logdir` puts in its HParams tab: the columns and the rows by name."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    tb_context = base_plugin.TBContext(
        logdir=str(logdir),
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
        multiplexer=multiplexer,
    )
    backend = backend_context.Context(tb_context)
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS]
    )
    groups = list_session_groups.Handler(request_context, backend, "", request).run().session_groups
    return experiment, {group.name: group for group in groups}


def _scalars(model_dir) -> dict[str, float]:
    """The last value of each scalar in model_dir's event files."""
    last: dict[str, tuple[int, float, float]] = {}
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        scalar_tags = set()  # a writer may give a tag's metadata only with its first value
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalar_tags.add(value.tag)
                if value.tag in scalar_tags:
                    key = (event.step, event.wall_time)
                    if value.tag not in last or key >= last[value.tag][:2]:
                        last[value.tag] = (*key, float(tf.make_ndarray(value.tensor)))
    return {tag: entry[2] for tag, entry in last.items()}


def _proto_hparams(group: api_pb2.SessionGroup) -> dict:
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in group.hparams.items()}


def test_hparams_are_every_set_flag_keyed_by_section():
    config = Config.demo().replace(optim={"learning_rate": 0.5}, distill={"teacher_resnet_depth": 50})
    values = hparams.hparams_of(config)
    assert values["train/train_mode"] == "pretrain"
    assert values["optim/learning_rate"] == 0.5
    assert values["model/resnet_depth"] == 18 and values["distill/teacher_resnet_depth"] == 50
    assert values["train/knn_eval"] is True and values["data/dataset"] == "mnist5k"
    assert "train/checkpoint" not in values and "distill/teacher_checkpoint" not in values  # None
    assert "train/mode" not in values  # how the command ran, not what was trained
    fields = {f"{s}/{name}": v for s, section in config.to_dict().items() for name, v in section.items()}
    assert set(values) == {key for key, value in fields.items() if value is not None} - {"train/mode"}
    assert all(type(value) in (bool, int, float, str) for value in values.values())


@pytest.mark.slow  # ~20 s: two tiny runs and a resume
def test_two_runs_are_two_rows_with_their_flags_and_every_scalar_as_a_column(tmp_path):
    logdir = tmp_path / "runs"
    first, second = logdir / "pretrain_lr1", logdir / "pretrain_lr05"
    config = _tiny()
    result = train_and_evaluate(config, str(first))
    # Another metric set: trained only, so no eval/ scalars.
    other = _tiny(optim={"learning_rate": 0.5}, train={"mode": "train", "train_steps": 1})
    train_and_evaluate(other, str(second))

    experiment, rows = _table(logdir)
    assert set(rows) == {str(first), str(second)}
    assert _proto_hparams(rows[str(first)]) == pytest.approx(hparams.hparams_of(config))
    assert _proto_hparams(rows[str(second)]) == pytest.approx(hparams.hparams_of(other))
    columns = {info.name: info for info in experiment.hparam_infos}
    assert set(columns) == set(hparams.hparams_of(config)) | set(hparams.hparams_of(other))
    # TensorBoard shows the flags that differ between the runs first.
    differing = {name for name, info in columns.items() if info.differs}
    assert differing == {"optim/learning_rate", "train/train_steps"}

    scalars = {str(first): _scalars(first), str(second): _scalars(second)}
    metrics = {(info.name.group, info.name.tag) for info in experiment.metric_infos}
    assert metrics == {("", tag) for values in scalars.values() for tag in values}
    for tag in ("eval/label_top_1_accuracy", "eval/knn_top_1_accuracy", "eval/linear_probe_top_1_accuracy",
                "train/total_loss"):
        assert ("", tag) in metrics
    for name, group in rows.items():
        (session,) = group.sessions
        assert {value.name.tag: value.value for value in session.metric_values} == pytest.approx(scalars[name])
    assert not any(tag.startswith("eval/") for tag in scalars[str(second)])
    assert scalars[str(first)]["eval/label_top_1_accuracy"] == pytest.approx(result["eval/label_top_1_accuracy"])

    # Resumed with the same flags (nothing left to train): the session file is kept as it is.
    (session_file,) = hparams.session_files(str(first))
    recorded = open(session_file, "rb").read()
    train_and_evaluate(config.replace(train={"mode": "train"}), str(first))
    assert hparams.session_files(str(first)) == [session_file]
    assert open(session_file, "rb").read() == recorded
    # (Resumed with other flags, it is replaced: the next test.)


def test_a_session_is_written_once_and_replaced_only_by_training_with_other_flags(tmp_path):
    strategy = tf.distribute.get_strategy()
    model_dir = str(tmp_path)
    config = Config.demo()
    assert hparams.write_session(config, model_dir, strategy)
    (path,) = hparams.session_files(model_dir)
    assert not hparams.write_session(config, model_dir, strategy)
    assert hparams.session_files(model_dir) == [path]

    # An eval run never replaces the trained flags, even with other eval flags.
    assert not hparams.write_session(config.replace(train={"mode": "eval", "knn_k": 5}), model_dir, strategy)
    assert hparams.read_sessions(path) == [(model_dir, hparams.hparams_of(config))]

    changed = config.replace(train={"train_steps": 7})
    assert hparams.write_session(changed, model_dir, strategy)
    (path,) = hparams.session_files(model_dir)
    assert hparams.read_sessions(path) == [(model_dir, hparams.hparams_of(changed))]

    # A file cut short by a crash is written again.
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-5])
    assert hparams.write_session(changed, model_dir, strategy)
    (path,) = hparams.session_files(model_dir)
    assert hparams.read_sessions(path) == [(model_dir, hparams.hparams_of(changed))]

    # A multi-worker run's other workers write nothing.
    other_dir = tmp_path / "worker"
    worker = types.SimpleNamespace(extended=types.SimpleNamespace(should_save_summary=False))
    assert not hparams.write_session(config, str(other_dir), worker)
    assert not hparams.session_files(str(other_dir))


def test_an_eval_of_a_model_dir_without_a_session_writes_one(tmp_path):
    # A model_dir trained before sessions were written, or a converted checkpoint's eval.
    config = Config.demo().replace(train={"mode": "eval"})
    assert hparams.write_session(config, str(tmp_path), tf.distribute.get_strategy())
    (path,) = hparams.session_files(str(tmp_path))
    assert hparams.read_sessions(path) == [(str(tmp_path), hparams.hparams_of(config))]
