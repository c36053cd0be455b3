"""scripts/compare.ipynb runs headless, top to bottom, on a Rust run and a PyTorch run, in a
kernel on this interpreter (the project venv, which has ipykernel): no jupyter install needed."""

import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, SCRIPTS


def test_the_comparison_notebook_runs(rust_run, python_run, mnist_dir, monkeypatch):
    # The kernel inherits this environment; the notebook reads its inputs from it.
    monkeypatch.setenv("LENET5_RUST_RUN", str(rust_run))
    monkeypatch.setenv("LENET5_TORCH_RUN", str(python_run))
    monkeypatch.setenv("LENET5_DATA", str(mnist_dir))
    nb = nbformat.read(SCRIPTS / "compare.ipynb", as_version=4)
    # "python3" resolves to the running interpreter when ipykernel is importable here.
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Rust (tch)" in text and "PyTorch" in text and "test images get different answers" in text
    # The fixtures train both sides with the same flags and seed: the same run, so no disagreements.
    assert "0 of 10000 test images get different answers" in text and "weights identical, bit for bit" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= 2, "curves and confusion matrices"
    assert not [o for o in outputs if o.output_type == "error"]
