"""Executes every notebook top to bottom on CPU (from its jupytext `.py`, the source of truth), and
checks the committed `.ipynb` pairs hold the same code."""

import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["01_moda_mechanism", "02_train_and_inspect", "03_kernel_benchmarks", "04_study_results"]


def _code(nb) -> list[str]:
  return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, tmp_path, monkeypatch):
  notebook = jupytext.read(os.path.join(REPO, "notebooks", f"{name}.py"))
  # The kernel is a fresh process: CPU, one device (as a user's laptop), the repository importable.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MODA_NOTEBOOK_WORKDIR", str(tmp_path / "run"))  # notebook 02's training run
  client = NotebookClient(notebook, timeout=400, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError (with the failing cell's traceback) on any error
  figures = sum(1 for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "image/png" in o.get("data", {}))
  assert figures >= 3, f"{name} drew {figures} figures"
  nbformat.write(notebook, str(tmp_path / f"{name}.executed.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_pair_is_in_sync(name):
  py = jupytext.read(os.path.join(REPO, "notebooks", f"{name}.py"))
  ipynb = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
  assert _code(ipynb) == _code(py), f"run `jupytext --sync notebooks/{name}.py`"
