"""notebooks/explore_results.ipynb runs headlessly against a real (tiny) sweep, so it never rots."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "explore_results.ipynb"


def test_explore_results_notebook_runs(tiny_sweep, monkeypatch):
    monkeypatch.setenv("FEDJAX_CODE_SWEEP", str(tiny_sweep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "scaling factor" in text or "ranked by HumanEval NLL" in text  # the answer was printed
    assert "4 cells finished" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the report's plots and the training curves were shown
