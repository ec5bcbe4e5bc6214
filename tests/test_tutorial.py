"""The tutorial notebook runs top to bottom with small settings, and is stored without outputs."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_tutorial_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DM_TUTORIAL_FAST", "1")
    monkeypatch.setenv("DM_ROOT", str(ROOT))
    monkeypatch.setenv("WANDB_MODE", "offline")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
