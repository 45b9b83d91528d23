"""The notebooks run top to bottom on the test pipeline's data, through the documented command
(`featurepipe notebooks --execute`), as a data scientist runs them after `make demo`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, Pipeline

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
def test_every_notebook_runs_through_the_notebooks_command(pipeline: Pipeline) -> None:
    # FEATUREPIPE_DATA_DIR / REDIS_URL in pipeline.env point at the pipeline fixture's copy
    done = subprocess.run(
        [sys.executable, "-m", "featurepipe.cli", "notebooks", "--execute", "--dir", str(ROOT / "notebooks"),
         "--repo", str(pipeline.repo)],
        env=pipeline.env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ok = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert ok == [p.name for p in NOTEBOOKS], done.stdout
