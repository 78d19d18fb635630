"""Importing the package turns TensorFlow's oneDNN kernels on unless the user chose."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_onednn_default_respects_an_explicit_choice(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    # No TensorFlow import: only the package's own side effect is checked.
    out = subprocess.run(
        [sys.executable, "-c", "import os, simclr_tf; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == expected
