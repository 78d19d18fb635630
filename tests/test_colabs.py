"""The notebooks in colabs/: they match their generator, and each runs top to bottom (with
nbclient) on a tiny checkpoint in the original's format, as a released one would be used."""

import importlib.util
import pathlib

import nbclient
import nbformat
import pytest

from simclr_tf import convert
from simclr_tf.models import SimCLRModel

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"


def _generator():
    spec = importlib.util.spec_from_file_location("build_notebooks", COLABS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOTEBOOKS = sorted(_generator().NOTEBOOKS)


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A tiny model with a 10-class head (freshly initialised), as a released SavedModel of
    the original holds it: its variables, and a graph telling which hidden the head reads."""
    model = SimCLRModel(10, resnet_depth=10, width_multiplier=0.25, cifar_stem=True, proj_out_dim=16)
    model.build((None, 32, 32, 3))
    directory = tmp_path_factory.mktemp("original")
    convert.save_as_original_saved_model(model, str(directory / "saved_model"))
    return directory


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_built_by_its_generator_without_outputs(name):
    on_disk = nbformat.read(COLABS / name, as_version=4)
    built = _generator().build(name)
    assert [(c.cell_type, c.source) for c in on_disk.cells] == [(c.cell_type, c.source) for c in built.cells]
    assert not any(c.get("outputs") for c in on_disk.cells if c.cell_type == "code")


def _text_outputs(notebook) -> str:
    return "\n".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, original_checkpoint, tmp_path, monkeypatch):
    # The kernel inherits these: the first cell reads them instead of the released path.
    monkeypatch.setenv("SIMCLR_COLAB_CHECKPOINT", str(original_checkpoint))
    monkeypatch.setenv("SIMCLR_COLAB_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("SIMCLR_COLAB_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(COLABS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any failure
    text = _text_outputs(notebook)
    expected = {
        "finetuning.ipynb": "with a gradient",
        "load_and_inference.ipynb": "logits_sup",
        "distillation_self_training.ipynb": "student-teacher agreement",
    }[name]
    assert expected in text
    if name == "load_and_inference.ipynb":  # the figure of images and their top-5 classes
        assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
