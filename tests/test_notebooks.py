"""The notebooks run top to bottom on the test pipeline's data, as a data scientist runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, Pipeline

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, pipeline: Pipeline) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # FEATUREPIPE_REPO / FEATUREPIPE_DATA_DIR / REDIS_URL point at the pipeline fixture's copy
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
