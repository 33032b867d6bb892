"""Strip outputs, execution counts and saved widget state from notebooks (nbstripout's job, in
~40 lines, with nbformat only). An executed widget notebook carries ~5 MB of widget state per plotly
figure (`docs/architecture.md` §4), so notebooks are committed without outputs;
tests/test_notebooks.py fails if any has them.

Usage: python tools/strip_outputs.py [--check] [NOTEBOOK ...]   (default: notebooks/*.ipynb)
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def has_outputs(nb) -> bool:
    """True if any code cell has outputs or an execution count, or widget state is saved."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    return any(c.outputs or c.execution_count is not None for c in cells) or \
        "widgets" in nb.metadata


def strip(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = ([Path(a) for a in argv if a != "--check"]
             or sorted((ROOT / "notebooks").glob("*.ipynb")))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if has_outputs(nb):
            dirty.append(path)
            if not check:
                strip(nb)
                nbformat.write(nb, path)
    verb = "have outputs" if check else "stripped"
    print(f"{len(dirty)} of {len(paths)} notebooks {verb}: " + ", ".join(p.name for p in dirty))
    return 1 if check and dirty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
