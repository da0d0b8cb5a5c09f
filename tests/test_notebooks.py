"""The notebooks run top to bottom; any failing cell fails the suite.

`make test` executes them on the session's micro organism history (``REVLENS_NOTEBOOK_HISTORY``, which the
notebooks use as it is instead of training one); `make test-all` also runs them as shipped, on the tiny
preset (``slow``). Both execute copies in memory: the files in notebooks/ are never rewritten.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# Per-cell limits, at least 3x the slowest cell at twice the idle 2-core time: micro cells take under
# 10 s idle; on the tiny preset the longest cell (03's blocking comparison, 15 runs) about 2.5 min.
CELL_TIMEOUT_S = 300
TINY_CELL_TIMEOUT_S = 1800


def execute(path: Path, workdir: Path, timeout: int) -> None:
    """Run a copy of the notebook in a fresh kernel (which inherits this process's environment)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") and not c.get("execution_count") for c in code), path


# The quick start runs in `make test`; the two longer notebooks (25 s together) in `make test-all`.
MICRO_RUNS = [
    pytest.param(p, id=p.stem, marks=() if p.stem == "01_quickstart" else pytest.mark.slow) for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", MICRO_RUNS)
def test_notebook_executes_on_the_micro_history(path, micro_history, tmp_path, monkeypatch):
    monkeypatch.setenv("REVLENS_NOTEBOOK_HISTORY", str(micro_history))
    monkeypatch.setenv("REVLENS_CACHE", str(tmp_path / "cache"))
    execute(path, tmp_path, CELL_TIMEOUT_S)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One tiny organism history for the three shipped notebooks (the first one trains it)."""
    return tmp_path_factory.mktemp("revlens_cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_as_shipped_on_the_tiny_preset(path, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("REVLENS_NOTEBOOK_HISTORY", raising=False)
    monkeypatch.delenv("REVLENS_NOTEBOOK_PRESET", raising=False)
    monkeypatch.setenv("REVLENS_CACHE", str(tiny_cache))
    execute(path, tmp_path, TINY_CELL_TIMEOUT_S)
