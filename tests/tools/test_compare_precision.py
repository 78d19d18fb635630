"""tools/compare_precision.py: the noise comparison (exact numbers) and a tiny end-to-end report."""

import importlib.util
import json
import pathlib

import pytest

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "compare_precision.py"
TAGS = ("train/contrast_loss", "train/contrast_acc", "train/supervised_loss")


def _tool():
    spec = importlib.util.spec_from_file_location("compare_precision", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(precision, seed, values):
    return {"precision": precision, "seed": seed, "curves": {t: dict(zip((5, 10, 15), values)) for t in TAGS}}


def test_gaps_and_verdict():
    tool = _tool()
    runs = [
        _run("float32", 0, [10.0, 9.0, 8.0]),
        _run("float32", 1, [10.5, 9.0, 7.0]),  # gap to run 0: (0.5 + 0 + 1) / 3 = 0.5
        _run("float32", 2, [10.0, 9.0, 8.0]),  # gaps: 0 to run 0, 0.5 to run 1
        _run("mixed_bfloat16", 0, [10.0, 9.3, 8.0]),  # gaps to float32: 0.1, (0.5 + 0.3 + 1) / 3, 0.1
        _run("mixed_bfloat16", 1, [10.0, 8.7, 8.0]),  # the same; 0.2 to the other bfloat16 run
        _run("mixed_float16", 0, [12.0, 11.0, 10.0]),  # 2 above two float32 runs, 13/6 from the other
        _run("mixed_float16", 1, [12.0, 11.0, 10.0]),
    ]
    result = tool.compare(runs)["train/contrast_loss"]
    assert result["float32_gap_mean"] == pytest.approx(1.0 / 3.0)
    assert result["float32_gap_max"] == pytest.approx(0.5)
    assert result["mixed_bfloat16_own_gap_mean"] == pytest.approx(0.2)
    assert result["mixed_bfloat16_gap_mean"] == pytest.approx((0.1 + 0.6 + 0.1) / 3)
    # Float32 mean curve: (10.1667, 9, 7.6667); bfloat16's: (10, 9, 8).
    assert result["mixed_bfloat16_mean_difference"] == pytest.approx((-1 / 6 + 0 + 1 / 3) / 3)
    assert result["mixed_bfloat16_within_noise"]  # 0.267 <= max(0.333, 0.2)
    assert result["mixed_float16_own_gap_mean"] == 0.0
    assert result["mixed_float16_gap_mean"] == pytest.approx((2 + 13 / 6 + 2) / 3)
    # (12 - 30.5 / 3) + (11 - 9) + (10 - 23 / 3) = 18.5 / 3, over 3 steps.
    assert result["mixed_float16_mean_difference"] == pytest.approx(18.5 / 9)
    assert not result["mixed_float16_within_noise"]


def test_needs_two_float32_runs():
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--runs=1"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--precisions=mixed_bfloat16,mixed_float16"])


@pytest.mark.slow
def test_tiny_report_reads_the_runs_event_files(tmp_path):
    tool = _tool()
    argv = ["--dataset=mnist5k", "--train_split=train[:64]", "--eval_split=validation[:32]", "--steps=2", "--resnet_depth=10",
            "--log_every_steps=1", "--width_multiplier=0.25", "--image_size=16", "--train_batch_size=8",
            "--runs=2", f"--output_dir={tmp_path}"]
    comparison = tool.main(argv)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["comparison"] == comparison
    assert [(r["precision"], r["seed"]) for r in report["runs"]] == [
        ("float32", 0), ("mixed_bfloat16", 0), ("float32", 1), ("mixed_bfloat16", 1)]
    for run in report["runs"]:
        assert set(run["curves"]["train/contrast_loss"]) == {"1", "2"}
        # The report's numbers are the run's own TensorBoard scalars.
        assert tool.read_curves(run["model_dir"])["train/contrast_loss"][2] == run["curves"]["train/contrast_loss"]["2"]
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "mixed_bfloat16 vs float32" in (tmp_path / "report.md").read_text()
    assert set(comparison["train/contrast_loss"]) == {
        "float32_gap_mean", "float32_gap_max", "mixed_bfloat16_own_gap_mean", "mixed_bfloat16_gap_mean",
        "mixed_bfloat16_mean_difference", "mixed_bfloat16_within_noise"}
    # A second call reuses the finished runs instead of training again.
    tool.main(argv)
    assert all(r["seconds"] is None for r in json.loads((tmp_path / "report.json").read_text())["runs"])
