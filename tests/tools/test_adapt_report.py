"""tools/adapt_report.py: corrupted targets, the classifier before and after adapting, reuse."""

import json


def test_report_of_two_corruptions_then_reuse(tiny_classifier_dir, tmp_path):
    from tools import adapt_report

    source = tiny_classifier_dir
    out = tmp_path / "report"
    argv = [f"--checkpoint={source}", "--dataset=mnist5k", "--split=validation[:24]",
            "--corruptions=contrast,gaussian_noise", "--severities=3", "--adapt_epochs=1",
            "--batch_size=8", f"--output_dir={out}"]
    report = adapt_report.adapt_report(adapt_report.parse_args(argv))
    assert set(report["cells"]) == {"contrast_3", "gaussian_noise_3"}
    for name, cell in report["cells"].items():
        assert 0 <= cell["unadapted"] <= 1 and 0 <= cell["adapted"] <= 1
        # Evaluated on the corrupted copies: 24 images each, in a folder dataset.
        assert len(list((out / "data" / name / "train").rglob("*.png"))) == 24
        # One adaptation epoch of 24 images at batch 8, from the source's weights.
        adapted = json.loads((out / name / "adapted" / "label_efficiency_run.json").read_text())
        assert adapted["global_step"] == 4  # 24 * 1 // 8 + 1, as the original counts steps
    assert (out / "report.png").stat().st_size > 0
    markdown = (out / "report.md").read_text()
    assert "| contrast | 3 |" in markdown and "| mean | 3 |" in markdown
    # A second call reuses every run.
    assert adapt_report.adapt_report(adapt_report.parse_args(argv)) == report
