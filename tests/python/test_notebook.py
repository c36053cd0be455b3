"""scripts/compare.ipynb runs headless, top to bottom, in a kernel on this interpreter (the
project venv, which has ipykernel and the binding): it trains the Rust twin through `import
lenet5` and the PyTorch model with stock torch.optim in that kernel, and finds them identical."""

import re

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, SCRIPTS


def test_the_comparison_notebook_runs(mnist_dir, monkeypatch):
    # The kernel inherits this environment; the notebook reads its inputs from it.
    monkeypatch.setenv("LENET5_LIMIT_TRAIN", "3000")
    monkeypatch.setenv("LENET5_EPOCHS", "2")
    monkeypatch.setenv("LENET5_DATA", str(mnist_dir))
    nb = nbformat.read(SCRIPTS / "compare.ipynb", as_version=4)
    # "python3" resolves to the running interpreter when ipykernel is importable here.
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Rust (lenet5)" in text and "PyTorch" in text and "test images get different answers" in text
    assert len(re.findall(r"epoch +2/2", text)) == 2, "both sides report their epochs"
    # lenet5.train's bar in a notebook is one HTML output updated in place (display_id).
    assert sum(o.output_type == "display_data" and "text/html" in o.get("data", {}) for o in outputs) == 1
    # Both sides train with the same recipe and seed in one process: the same run, so no disagreements.
    assert "0 of 10000 test images get different answers" in text and "weights identical, bit for bit" in text
    # The twin in the notebook's own loop: the libtorch engine the same run, the direct one to rounding.
    assert re.search(r"twin, libtorch engine .*weights identical, bit for bit", text), text
    direct = re.search(r"twin, direct engine .*test accuracy ([0-9.]+)%, largest \|weight difference\| ([0-9.e-]+)", text)
    assert direct, text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= 2, "curves and confusion matrices"
    assert not [o for o in outputs if o.output_type == "error"]
