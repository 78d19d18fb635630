"""tools/label_efficiency.py: the three methods per fraction, a semi-supervised method's two
rows, the report files, resuming."""

import importlib.util
import json
import logging
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "label_efficiency.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("label_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _args(tool, output_dir):
    return tool.parse_args([
        "--dataset=mnist5k", "--train_split=train[:200]", "--eval_split=validation[:64]",
        "--budget=smoke", "--fractions=0.05,0.2", f"--output_dir={output_dir}", "--batch_size=16",
        # FixMatch: 2 steps of 4 labeled + 2 x 28 unlabeled digits per run.
        "--methods=fixmatch",
    ])


def _config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


@pytest.mark.slow
def test_smoke_report(tool, tmp_path, capsys, caplog):
    # On absl's logger: a test run earlier in the same process may have set its level.
    with caplog.at_level(logging.INFO, logger="absl"):
        report = tool.label_efficiency(_args(tool, tmp_path))

    rows = ["supervised", "finetune", "distill", "fixmatch_scratch", "fixmatch_simclr"]
    assert list(report["top_1"]) == list(report["rows"]) == rows
    for method in report["top_1"].values():
        assert set(method) == {"0.05", "0.2"}
        assert all(0.0 <= value <= 1.0 for value in method.values())
    assert set(report["run_seconds"]) == {"pretrain"} | {f"{row}_{tag}" for row in rows for tag in ("0.05", "0.2")}
    assert json.loads((tmp_path / "report.json").read_text()) == report
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("| (") == 3 and "5% labels" in markdown and "20% labels" in markdown
    assert "| fixmatch (scratch) |" in markdown and "| fixmatch (from SimCLRv2) |" in markdown
    assert (tmp_path / "report.png").stat().st_size > 1000

    # FixMatch: from scratch as (a), from (b)'s fine-tuned model as (b); the same labeled
    # subset, split and model; its budget's steps and batch.
    # Each run's log, in run order (scratch, then from SimCLRv2, per fraction): distill
    # also starts from the fine-tuned model, so the restore is checked in FixMatch's own log.
    fixmatch_logs = caplog.text.split("fixmatch on mnist5k")[1:]
    assert len(fixmatch_logs) == 4
    for index, tag in enumerate(("0.05", "0.2")):
        scratch, simclr = _config(tmp_path / f"fixmatch_scratch_{tag}"), _config(tmp_path / f"fixmatch_simclr_{tag}")
        supervised, finetune = _config(tmp_path / f"supervised_{tag}"), _config(tmp_path / f"finetune_{tag}")
        for config, like in ((scratch, supervised), (simclr, finetune)):
            assert config["train"]["train_mode"] == "fixmatch"
            assert config["data"] == like["data"] and config["model"] == like["model"]
            assert (config["train"]["train_steps"], config["train"]["train_batch_size"]) == (2, 4)
        assert scratch["train"]["checkpoint"] is None
        assert simclr["train"]["checkpoint"] == str(tmp_path / f"finetune_{tag}")
        scratch_log, simclr_log = fixmatch_logs[2 * index], fixmatch_logs[2 * index + 1]
        assert "training from scratch" in scratch_log and "Initialised from" not in scratch_log
        # The run restored the fine-tuned weights, classifier included.
        initialised = f"Initialised from {tmp_path / f'finetune_{tag}' / 'ckpt-4'}: restored"
        assert initialised in simclr_log
        summary = simclr_log.split(initialised)[1].splitlines()[0]  # "N variables: backbone (..), ..."
        assert "backbone" in summary and "supervised_head" in summary

    # Finetune starts from the pretraining run; distill from (and with) the finetuned teacher.
    distill_config = json.loads((tmp_path / "distill_0.05" / "config.json").read_text())
    assert distill_config["distill"]["teacher_checkpoint"] == str(tmp_path / "finetune_0.05")
    assert distill_config["train"]["checkpoint"] == str(tmp_path / "finetune_0.05")
    assert json.loads((tmp_path / "finetune_0.05" / "config.json").read_text())["train"]["checkpoint"] == str(
        tmp_path / "pretrain"
    )
    finetune_config = json.loads((tmp_path / "finetune_0.2" / "config.json").read_text())
    assert finetune_config["data"]["labeled_fraction"] == 0.2
    assert finetune_config["model"]["ft_proj_selector"] == 1
    assert not json.loads((tmp_path / "pretrain" / "config.json").read_text())["train"]["lineareval_while_pretraining"]

    # A second call reuses every finished run.
    capsys.readouterr()
    again = tool.label_efficiency(_args(tool, tmp_path))
    assert again["top_1"] == report["top_1"]
    assert capsys.readouterr().out.count("reusing") == 11


def test_budget_overrides(tool):
    args = tool.parse_args(["--budget=hour", "--pretrain_epochs=3", "--width_multiplier=0.5"])
    budget = tool.resolve_budget(args)
    assert budget.pretrain_epochs == 3 and budget.width_multiplier == 0.5
    assert budget.batch_size == tool.BUDGETS["hour"].batch_size


def test_methods_flag(tool):
    from simclr_tf.config import SEMI_SUPERVISED_MODES

    assert tool.parse_args([]).methods == []
    assert tool.parse_args(["--methods=all"]).methods == list(SEMI_SUPERVISED_MODES)
    assert tool.parse_args(["--methods=uda, fixmatch"]).methods == ["uda", "fixmatch"]
    with pytest.raises(SystemExit):
        tool.parse_args(["--methods=fixmatch,mixmatch"])


def test_method_steps_share_one_image_budget(tool):
    """Every method passes about the same number of images through the network per run."""
    budget = tool.BUDGETS["hour"]  # 32 labeled images a step, 7 x 32 unlabeled per view
    assert tool.images_per_step("fixmatch", 32, 7) == 32 + 2 * 224
    assert tool.images_per_step("s4l", 32, 7) == 4 * (32 + 224)  # one view, four rotations
    for method in ("fixmatch", "uda", "mean_teacher", "debiasmatch", "dst"):
        assert tool.method_steps(budget, method, 7) == round(budget.method_images / 480)
    assert tool.method_steps(budget, "s4l", 7) == round(budget.method_images / 1024)
