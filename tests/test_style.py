"""The repository's style rules, checked: no line over 100 columns in q4lab/, tests/, bench/ and
tools/, and ``ruff check`` (settings in pyproject.toml ``[tool.ruff]``: pycodestyle, pyflakes,
bugbear, pyupgrade, line length 100) reports nothing.

Columns are characters (a line of 100 characters passes, whatever its bytes in UTF-8). Files read:
every tracked or untracked, not ignored, text file in those folders except the machine-written
benchmark results (bench/results/*.json). The C++ sources follow .clang-format (not run here: the
files are not reformatted wholesale). ruff is a dev dependency; without it the ruff test skips with
the command that installs it.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLUMNS = 100
CHECKED = ["q4lab", "tests", "bench", "tools"]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".yaml", ".yml"}
HAS_RUFF = importlib.util.find_spec("ruff") is not None


def checked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                          *CHECKED], cwd=ROOT, capture_output=True, text=True, check=True)
    files = []
    for rel in sorted(set(out.stdout.split())):
        path = ROOT / rel
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def long_lines(name: str, text: str) -> list[str]:
    return [f"{name}:{lineno}: {len(line)} columns"
            for lineno, line in enumerate(text.splitlines(), 1) if len(line) > MAX_COLUMNS]


def run_ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_no_line_over_100_columns():
    files = checked_files()
    assert len(files) > 50, files  # the scan found the tree
    found = []
    for path in files:
        found += long_lines(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    assert not found, f"{len(found)} lines over {MAX_COLUMNS} columns (wrap them):\n" + \
        "\n".join(found)


def test_the_line_check_finds_a_long_line():
    text = "x = 1\n" + "y" * MAX_COLUMNS + "\n" + "z" * (MAX_COLUMNS + 1) + "\n"
    assert long_lines("f.py", text) == ["f.py:3: 101 columns"]
    assert long_lines("f.py", "é" * MAX_COLUMNS) == []  # characters, not UTF-8 bytes


@pytest.mark.skipif(not HAS_RUFF, reason="ruff is not installed: pip install -e '.[dev]'")
def test_ruff_reports_nothing():
    result = run_ruff(".")
    assert result.returncode == 0, f"ruff check found problems (fix them; `ruff check --fix` " \
        f"fixes some):\n{result.stdout}{result.stderr}"


@pytest.mark.skipif(not HAS_RUFF, reason="ruff is not installed: pip install -e '.[dev]'")
def test_ruff_uses_the_repository_settings(tmp_path):
    """The settings are read and catch what they claim: an unused import, a 101-column line, a
    loop variable captured late (bugbear)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = '" + "a" * (MAX_COLUMNS - 5) + "'\n"
                   "fns = [lambda: i for i in range(3)]\n")
    result = run_ruff("--config", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    for rule in ("F401", "E501", "B023"):
        assert rule in result.stdout, (rule, result.stdout)
