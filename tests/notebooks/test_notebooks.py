"""Every notebook in notebooks/ runs top to bottom (a Python kernel of this interpreter).

The notebooks that need trained models (predictions, correlation_maps) train tiny ones
through the pipeline and keep them in the stage cache ($FSS_CACHE): one cache for the
whole test session, so the first of them trains and the second reuses the checkpoints.
The scores of predictions.ipynb are checked: the tiny models must segment, not just run."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.fixture(scope="session")
def notebook_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook-cache")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, notebook_cache, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: the cache, and the sources under test (a
    # relative PYTHONPATH would point elsewhere from the kernel's working directory).
    monkeypatch.setenv("FSS_CACHE", str(notebook_cache))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    notebook = nbformat.read(path, as_version=4)
    # Per cell; a bound for hangs only (the tiny training cell takes 2-3 min on 2 busy cores).
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "execute_result" for o in outputs)
    if path.name == "predictions.ipynb":
        check_prediction_scores(notebook)


# mIoU (%) the on-the-fly models of predictions.ipynb must exceed on its 24 episodes (HDMNet
# scores ~26, HSNet ~44; a few training steps leave either at 0). Predicting background
# everywhere scores 0, foreground everywhere the all-foreground baseline (~18) the notebook
# prints beside it.
MIN_MIOU = 20.0


def check_prediction_scores(notebook):
    """The cell tagged ``scores`` shows the models' mIoU and the all-foreground baseline;
    both tiny models must have learnt something."""
    cells = [cell for cell in notebook.cells if "scores" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "predictions.ipynb needs exactly one cell tagged 'scores'"
    (result,) = [o for o in cells[0].outputs if o.get("output_type") == "execute_result"]
    scores = ast.literal_eval(result["data"]["text/plain"])
    baseline = scores["all foreground"]["mIoU"]
    for name in ("HSNet", "HDMNet"):
        miou = scores[name]["mIoU"]
        assert miou > MIN_MIOU, f"{name}: test mIoU {miou} <= {MIN_MIOU}"
        assert miou > baseline, f"{name}: test mIoU {miou} <= all-foreground {baseline}"
