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


def _args(tool, output_dir, fractions):
    return tool.parse_args([
        "--dataset=mnist5k", "--train_split=train[:200]", "--eval_split=validation[:64]",
        "--budget=smoke", f"--fractions={fractions}", f"--output_dir={output_dir}", "--batch_size=16",
        # FixMatch: 2 steps of 4 labeled + 2 x 28 unlabeled digits per run.
        "--methods=fixmatch",
    ])


def _config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


ROWS = ["supervised", "finetune", "distill", "fixmatch_scratch", "fixmatch_simclr"]


def _check_report(report, out, tags):
    """The report's rows, cells and files for label fractions `tags` (e.g. "0.05")."""
    assert list(report["top_1"]) == list(report["rows"]) == ROWS
    for method in report["top_1"].values():
        assert set(method) == set(tags)
        assert all(0.0 <= value <= 1.0 for value in method.values())
    assert set(report["run_seconds"]) == {"pretrain"} | {f"{row}_{tag}" for row in ROWS for tag in tags}
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert markdown.count("| (") == 3
    assert all(f"{float(tag):.0%} labels" in markdown for tag in tags)
    assert "| fixmatch (scratch) |" in markdown and "| fixmatch (from SimCLRv2) |" in markdown
    assert (out / "report.png").stat().st_size > 1000


def _check_configs(config_of, out, tags):
    """Each run's resolved config (`config_of(run name)`): what it starts from and trains on."""
    # FixMatch: from scratch as (a), from (b)'s fine-tuned model as (b); the same labeled
    # subset, split and model; its budget's steps and batch.
    for tag in tags:
        scratch, simclr = config_of(f"fixmatch_scratch_{tag}"), config_of(f"fixmatch_simclr_{tag}")
        supervised, finetune = config_of(f"supervised_{tag}"), config_of(f"finetune_{tag}")
        for config, like in ((scratch, supervised), (simclr, finetune)):
            assert config["train"]["train_mode"] == "fixmatch"
            assert config["data"] == like["data"] and config["model"] == like["model"]
            assert (config["train"]["train_steps"], config["train"]["train_batch_size"]) == (2, 4)
        assert scratch["train"]["checkpoint"] is None
        assert simclr["train"]["checkpoint"] == str(out / f"finetune_{tag}")
        # Finetune starts from the pretraining run, on its fraction of the labels, from the
        # first projection layer; distill from (and with) the finetuned teacher.
        assert finetune["train"]["checkpoint"] == str(out / "pretrain")
        assert finetune["data"]["labeled_fraction"] == float(tag)
        assert finetune["model"]["ft_proj_selector"] == 1
        distill = config_of(f"distill_{tag}")
        assert distill["distill"]["teacher_checkpoint"] == str(out / f"finetune_{tag}")
        assert distill["train"]["checkpoint"] == str(out / f"finetune_{tag}")
    assert not config_of("pretrain")["train"]["lineareval_while_pretraining"]


@pytest.mark.slow
def test_smoke_report(tool, tmp_path, capsys, caplog):
    # The real runs at one label fraction (6 runs): every row kind once.
    # test_every_fraction_gets_its_runs_cells_and_columns checks two fractions without training.
    # On absl's logger: a test run earlier in the same process may have set its level.
    with caplog.at_level(logging.INFO, logger="absl"):
        report = tool.label_efficiency(_args(tool, tmp_path, "0.05"))

    _check_report(report, tmp_path, ["0.05"])
    _check_configs(lambda name: _config(tmp_path / name), tmp_path, ["0.05"])
    # Each run's log, in run order (scratch, then from SimCLRv2): distill also starts from
    # the fine-tuned model, so the restore is checked in FixMatch's own log.
    scratch_log, simclr_log = caplog.text.split("fixmatch on mnist5k")[1:]
    assert "training from scratch" in scratch_log and "Initialised from" not in scratch_log
    # The run restored the fine-tuned weights, classifier included.
    initialised = f"Initialised from {tmp_path / 'finetune_0.05' / 'ckpt-4'}: restored"
    assert initialised in simclr_log
    summary = simclr_log.split(initialised)[1].splitlines()[0]  # "N variables: backbone (..), ..."
    assert "backbone" in summary and "supervised_head" in summary

    # A second call reuses every finished run.
    capsys.readouterr()
    again = tool.label_efficiency(_args(tool, tmp_path, "0.05"))
    assert again["top_1"] == report["top_1"]
    assert capsys.readouterr().out.count("reusing") == 6


def test_every_fraction_gets_its_runs_cells_and_columns(tool, tmp_path, monkeypatch):
    # Two label fractions, each run replaced by one that records its config and returns a
    # top-1 of its own: the report must put each run's result in its row and column.
    configs, top_1 = {}, {}

    def fake_run(config, model_dir):
        name = pathlib.Path(model_dir).name
        assert name not in configs, f"{name} ran twice"
        configs[name] = json.loads(config.to_json())
        top_1[name] = len(top_1) / 100
        return {"eval/label_top_1_accuracy": top_1[name], "eval/knn_top_1_accuracy": 0.5, "seconds": 60.0}

    monkeypatch.setattr(tool, "run", fake_run)
    report = tool.label_efficiency(_args(tool, tmp_path, "0.05,0.2"))
    tags = ["0.05", "0.2"]
    assert set(configs) == {"pretrain"} | {f"{row}_{tag}" for row in ROWS for tag in tags}
    assert report["top_1"] == {row: {tag: top_1[f"{row}_{tag}"] for tag in tags} for row in ROWS}
    _check_report(report, tmp_path, tags)
    _check_configs(configs.__getitem__, tmp_path, tags)


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
    # semivit fine-tunes a classifier: only its row from (b)'s model.
    assert [row for row in tool.row_titles(["fixmatch", "semivit"]) if "_" in row] == [
        "fixmatch_scratch", "fixmatch_simclr", "semivit_simclr"]


def test_method_steps_share_one_image_budget(tool):
    """Every method passes about the same number of images through the network per run."""
    budget = tool.BUDGETS["hour"]  # 32 labeled images a step, 7 x 32 unlabeled per view
    assert tool.images_per_step("fixmatch", 32, 7) == 32 + 2 * 224
    assert tool.images_per_step("s4l", 32, 7) == 4 * (32 + 224)  # one view, four rotations
    for method in ("fixmatch", "uda", "mean_teacher", "debiasmatch", "dst"):
        assert tool.method_steps(budget, method, 7) == round(budget.method_images / 480)
    assert tool.method_steps(budget, "s4l", 7) == round(budget.method_images / 1024)


def test_big_to_small_rows_and_unlabeled_batch_ratio(tool, tmp_path, monkeypatch):
    # The two student rows: (b) teaches a narrower student from random weights, the rows
    # differing only in the teacher's view; --unlabeled_batch_ratio reaches every method run.
    configs = {}

    def fake_run(config, model_dir):
        configs[pathlib.Path(model_dir).name] = json.loads(config.to_json())
        return {"eval/label_top_1_accuracy": len(configs) / 100, "eval/knn_top_1_accuracy": 0.5, "seconds": 60.0}

    monkeypatch.setattr(tool, "run", fake_run)
    args = tool.parse_args([
        "--dataset=mnist5k", "--train_split=train[:200]", "--eval_split=validation[:64]", "--budget=smoke",
        "--fractions=0.05", f"--output_dir={tmp_path}", "--methods=s4l", "--unlabeled_batch_ratio=1",
        "--student_resnet_depth=18", "--student_width_multiplier=0.5",
    ])
    report = tool.label_efficiency(args)
    assert list(report["rows"]) == ["supervised", "finetune", "distill", "student_fixed", "student_consistent",
                                    "s4l_scratch", "s4l_simclr"]
    fixed, consistent = configs["student_fixed_0.05"], configs["student_consistent_0.05"]
    supervised = configs["supervised_0.05"]
    for student in (fixed, consistent):
        assert student["train"]["train_mode"] == "distill" and student["train"]["checkpoint"] is None
        assert student["train"]["train_epochs"] == tool.BUDGETS["smoke"].student_distill_epochs
        assert student["distill"]["teacher_checkpoint"] == str(tmp_path / "finetune_0.05")
        assert student["distill"]["distill_label_weight"] == 0.0
        assert (student["model"]["resnet_depth"], student["model"]["width_multiplier"]) == (18, 0.5)
        assert supervised["model"]["resnet_depth"] == 10  # the smoke budget's teacher
        assert student["data"] == supervised["data"]
    assert (fixed["distill"]["distill_views"], fixed["distill"]["mixup_alpha"]) == ("fixed", 0.0)
    assert (consistent["distill"]["distill_views"], consistent["distill"]["mixup_alpha"]) == ("consistent", 1.0)
    # Everything else about the two students is the same.
    for section in ("train", "model", "optim", "data"):
        assert fixed[section] == consistent[section]
    assert configs["s4l_scratch_0.05"]["semi"]["unlabeled_batch_ratio"] == 1
    assert report["unlabeled_batch_ratio"] == 1
    assert report["method_steps"]["s4l"] == tool.method_steps(tool.BUDGETS["smoke"], "s4l", 1)
    markdown = (tmp_path / "report.md").read_text()
    assert "| (c') (b) distilled into ResNet-18 x0.5, fixed teacher view |" in markdown
    assert "| (c') (b) distilled into ResNet-18 x0.5, consistent views + mixup |" in markdown
    assert "Big-to-small rows (c')" in markdown and "1 times as many" in markdown
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_student_architecture_defaults_to_the_budgets(tool):
    budget = tool.BUDGETS["hour"]
    assert tool.student_architecture(tool.parse_args([]), budget) is None
    assert tool.student_architecture(tool.parse_args(["--student_resnet_depth=10"]), budget) == (10, 0.25)
    assert tool.student_architecture(tool.parse_args(["--student_width_multiplier=0.5"]), budget) == (18, 0.5)


def test_vit_backbone_runs_every_row_with_adamw(tool, tmp_path, monkeypatch):
    # --backbone=vit: the same rows on a ViT, every run with AdamW at the ViT rates; the
    # ResNet rows keep their optimizers (checked against the defaults' table).
    configs = {}

    def fake_run(config, model_dir):
        configs[pathlib.Path(model_dir).name] = json.loads(config.to_json())
        return {"eval/label_top_1_accuracy": 0.5, "eval/knn_top_1_accuracy": 0.5, "seconds": 60.0}

    monkeypatch.setattr(tool, "run", fake_run)
    common = ["--dataset=mnist5k", "--train_split=train[:200]", "--eval_split=validation[:64]", "--budget=smoke",
              "--fractions=0.05", "--methods=fixmatch"]
    report = tool.label_efficiency(tool.parse_args(
        common + [f"--output_dir={tmp_path / 'vit'}", "--backbone=vit", "--patch_size=8"]))
    assert report["model"] == "ViT-Tiny/8"
    rates = tool.LEARNING_RATES["vit"]
    expected_rates = {"pretrain": rates["pretrain"], "supervised_0.05": rates["scratch"],
                      "finetune_0.05": rates["pretrained"], "distill_0.05": rates["pretrained"],
                      "fixmatch_scratch_0.05": rates["scratch"] * 256 / 4,
                      "fixmatch_simclr_0.05": rates["pretrained"] * 256 / 4}
    for name, rate in expected_rates.items():
        config = configs[name]
        assert (config["model"]["backbone"], config["model"]["vit_size"], config["model"]["patch_size"]) == (
            "vit", "tiny", 8), name
        assert (config["optim"]["optimizer"], config["optim"]["weight_decay"]) == ("adamw", 0.05), name
        assert config["optim"]["learning_rate"] == pytest.approx(rate), name
    assert "ViT-Tiny/8" in (tmp_path / "vit" / "report.md").read_text()

    configs.clear()
    tool.label_efficiency(tool.parse_args(common + [f"--output_dir={tmp_path / 'resnet'}"]))
    optimizers = {name: (c["optim"]["optimizer"], c["optim"]["learning_rate"], c["optim"]["weight_decay"])
                  for name, c in configs.items() if name != "pretrain"}
    assert optimizers == {
        "supervised_0.05": ("momentum", 0.1, 1e-4), "finetune_0.05": ("momentum", 0.003, 1e-4),
        "distill_0.05": ("momentum", 0.003, 1e-5),
        "fixmatch_scratch_0.05": ("momentum", 0.1 * 256 / 4, 1e-4),
        "fixmatch_simclr_0.05": ("momentum", 0.003 * 256 / 4, 1e-4),
    }
    assert (configs["pretrain"]["optim"]["optimizer"], configs["pretrain"]["optim"]["learning_rate"]) == ("lars", 1.0)
    assert configs["supervised_0.05"]["model"]["backbone"] == "resnet"
    with pytest.raises(SystemExit):
        tool.parse_args(["--backbone=vit", "--student_resnet_depth=10"])
