"""Every numbered notebook runs headless, top to bottom, AT FULL SIZE, and ends with a real check;
no notebook in the repository carries outputs.

Each ``notebooks/[0-9]*.ipynb`` (so notebooks added later are picked up by name) runs once with
nbclient in a fresh kernel, working directory notebooks/, without ``Q4LAB_FAST``: CI runs what a
user runs (`docs/architecture.md` §4-6). A probe cell appended to the executed copy reads the
notebook's own ``FAST`` flag back from the kernel, so a notebook that shrinks itself anyway fails.
Style after the triton tutorials (the tutorial is also a test) and nbmake. Outputs are never
committed (an executed widget notebook holds megabytes of widget state; ``tools/strip_outputs.py``).
"""
import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9]*.ipynb"))
CELL_TIMEOUT_S = 900
PROBE = "print('q4lab-probe FAST =', repr(globals().get('FAST', 'undefined')))"
sys.path.insert(0, str(ROOT / "tools"))
from strip_outputs import has_outputs  # noqa: E402


def repo_notebooks() -> list[Path]:
    """Every .ipynb git knows about (tracked or not ignored), outside checkpoints."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split() if ".ipynb_checkpoints" not in p]


def test_the_series_is_there():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(set(numbers)) == len(numbers), f"two notebooks share a number: {numbers}"
    assert [f"{i:02d}" for i in range(1, 8)] == numbers[:7], numbers
    assert all(p.name[2] == "_" for p in NOTEBOOKS), [p.name for p in NOTEBOOKS]


def test_no_notebook_has_outputs():
    paths = repo_notebooks()
    assert set(NOTEBOOKS) <= set(paths)
    dirty = [str(p.relative_to(ROOT)) for p in paths if has_outputs(nbformat.read(p, 4))]
    assert not dirty, f"notebooks with outputs (run python tools/strip_outputs.py): {dirty}"


def closing_asserts(source: str) -> list[ast.Assert]:
    """The ``assert`` statements of a code cell that test something (not a constant)."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Assert) and not isinstance(node.test, ast.Constant)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_ends_with_a_check(path):
    code = [c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert closing_asserts(code[-1]), \
        f"{path.name}: the last code cell must contain an assert statement that tests something"


@pytest.mark.parametrize("source, ok", [
    ("x = 1\nassert x == 1, 'x'", True),
    ("for v in range(3):\n    assert v < 3", True),
    ("print('done')  # assert everything", False),
    ("s = 'assert x'\nassert True", False),
])
def test_the_closing_check_rule_can_fail(source, ok):
    assert bool(closing_asserts(source)) is ok


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_full_size(path, monkeypatch):
    monkeypatch.delenv("Q4LAB_FAST", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, 4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{str(exc)[-4000:]}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.0f} s at full size")
    code = [c for c in nb.cells if c.cell_type == "code"]
    skipped = [i for i, c in enumerate(code[:n_code]) if c.execution_count is None]
    assert not skipped, f"{path.name}: code cells {skipped} did not run (skip-execution tag?)"
    probe = "".join(o.get("text", "") for o in code[-1].outputs)
    assert "q4lab-probe FAST =" in probe, probe
    assert probe.split("=", 1)[1].strip() in ("False", "'undefined'"), \
        f"{path.name} ran with its FAST flag set although Q4LAB_FAST was unset: {probe}"
