"""tools/benchmark.py in a smoke configuration: every figure is reported and plausible."""

import importlib.util
import json
import pathlib

import pytest

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "benchmark.py"


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_figure(capsys):
    tool = _tool()
    tool.main(["--resnet_depth=18", "--width_multiplier=0.25", "--image_size=16",
               "--train_batch_size=8", "--steps=1", "--warmup_steps=1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("pipeline_images_per_second", "step_images_per_second", "loop_images_per_second",
                "matmul_gflops_per_second", "conv3x3_gflops_per_second", "peak_rss_gb"):
        assert result[key] > 0, key
    # R18 x0.25 at 16 px: the forward pass is tens of MFLOPs, training 6x that.
    assert 0.005 < result["forward_gflops_per_image"] < 0.1
    assert result["train_gflops_per_image"] == pytest.approx(6 * result["forward_gflops_per_image"])
    assert result["config"]["precision"] == "float32"


def test_profile_lists_the_convolutions_among_the_costly_op_types(tmp_path, capsys):
    tool = _tool()
    tool.main(["--resnet_depth=18", "--width_multiplier=0.25", "--image_size=16", "--train_batch_size=8",
               "--steps=1", "--warmup_steps=1", "--json", f"--profile_dir={tmp_path}", "--top_ops=50"])
    pairs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ms_per_step_by_op_type"]
    times = [ms for _, ms in pairs]
    assert times == sorted(times, reverse=True)
    by_type = dict(pairs)
    # The forward conv and both of its gradients (oneDNN's names carry a prefix).
    for op in ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput"):
        assert any(name.endswith(op) and ms > 0 for name, ms in by_type.items()), (op, by_type)
    # Batch norm runs fused, not as separate elementwise ops.
    assert any("FusedBatchNorm" in name for name in by_type), by_type
    assert list(tmp_path.glob("**/*.xplane.pb"))
