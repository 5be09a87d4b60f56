"""Every notebook under notebooks/ runs clean, top to bottom, on the tiny weights (nbclient)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "storyboard.ipynb", "transitions.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, tiny_weights, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    # The kernel imports this checkout (not another install), finds the tiny set as "installed
    # weights", keeps its presets in the test folder, and uses a CPU thread or two.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("RETARGET_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("RETARGET_PRESETS", str(tmp_path / "presets"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # "python3" is ipykernel's own kernel; jupyter_client starts it with this interpreter.
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
