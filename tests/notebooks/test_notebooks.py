"""Every notebook in notebooks/ runs top to bottom (a Python kernel of this interpreter).

The notebooks that need trained models (predictions, correlation_maps) train tiny ones
through the pipeline and keep them in the stage cache ($FSS_CACHE): one cache for the
whole test session, so the first of them trains and the second reuses the checkpoints."""

from __future__ import annotations

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
    # Per cell; a bound for hangs only (a tiny training cell takes ~1 min on 2 idle cores).
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "execute_result" for o in outputs)
