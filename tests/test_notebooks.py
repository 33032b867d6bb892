"""Every notebook under notebooks/ runs headless, top to bottom, and its closing check passes;
no notebook in the repository carries outputs.

Runs each ``notebooks/*.ipynb`` it finds (so notebooks added later are covered) with nbclient in a
fresh kernel, ``Q4LAB_FAST=1`` (heavy cells sized down), working directory = notebooks/. Style after
the triton tutorials (the tutorial is also a test) and nbmake; output size rule: DESIGN.md §7.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))
from strip_outputs import has_outputs  # noqa: E402


def repo_notebooks() -> list[Path]:
    """Every .ipynb git knows about (tracked or not ignored), outside checkpoints."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split() if ".ipynb_checkpoints" not in p]


def test_the_series_is_there():
    names = [p.name[:3] for p in NOTEBOOKS]
    assert names[:6] == ["01_", "02_", "03_", "04_", "05_", "06_"], names


def test_no_notebook_has_outputs():
    paths = repo_notebooks()
    assert set(NOTEBOOKS) <= set(paths)
    dirty = [str(p.relative_to(ROOT)) for p in paths if has_outputs(nbformat.read(p, 4))]
    assert not dirty, f"notebooks with outputs (run python tools/strip_outputs.py): {dirty}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_ends_with_a_check(path):
    code = [c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code"]
    assert code and "assert" in code[-1], f"{path.name}: the last code cell must assert something"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("Q4LAB_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, 4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{str(exc)[-4000:]}", pytrace=False)
    assert os.environ["Q4LAB_FAST"] == "1"
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert not any(o.get("output_type") == "error" for o in last.outputs)
