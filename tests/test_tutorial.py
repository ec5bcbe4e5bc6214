"""The tutorial notebook runs top to bottom with small settings, and is stored without outputs."""
import nbformat

from conftest import ROOT


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_tutorial_executes(tmp_path, monkeypatch):
    """Every code cell in order, in this process (a Jupyter kernel would re-import torch and Lightning, ~12 s): the
    cells use no magics, and display() outside IPython only prints. A failing cell raises here with its traceback."""
    monkeypatch.setenv("DM_TUTORIAL_FAST", "1")
    monkeypatch.setenv("DM_ROOT", str(ROOT))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    assert cells and not any(line.lstrip().startswith(("%", "!")) for c in cells for line in c.splitlines())
    namespace = {"__name__": "__tutorial__"}
    for i, source in enumerate(cells):
        exec(compile(source, f"tutorial.ipynb code cell {i}", "exec"), namespace)
    assert namespace["attr"]["lds/logistic/direct"] > namespace["attr"]["lds/logistic/control: grad dot"]
