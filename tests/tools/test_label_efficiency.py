"""tools/label_efficiency.py: the three methods per fraction, the report files, resuming."""

import importlib.util
import json
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
    ])


def test_smoke_report(tool, tmp_path, capsys):
    report = tool.label_efficiency(_args(tool, tmp_path))

    assert set(report["top_1"]) == {"supervised", "finetune", "distill"}
    for method in report["top_1"].values():
        assert set(method) == {"0.05", "0.2"}
        assert all(0.0 <= value <= 1.0 for value in method.values())
    assert json.loads((tmp_path / "report.json").read_text()) == report
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("| (") == 3 and "5% labels" in markdown and "20% labels" in markdown
    assert (tmp_path / "report.png").stat().st_size > 1000
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
    assert capsys.readouterr().out.count("reusing") == 7


def test_budget_overrides(tool):
    args = tool.parse_args(["--budget=hour", "--pretrain_epochs=3", "--width_multiplier=0.5"])
    budget = tool.resolve_budget(args)
    assert budget.pretrain_epochs == 3 and budget.width_multiplier == 0.5
    assert budget.batch_size == tool.BUDGETS["hour"].batch_size
