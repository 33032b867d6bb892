"""Every document the repository cites is in the repository (`docs/architecture.md` §6).

The format, the bitsandbytes differences and the architecture are written down in ``docs/``
(``docs/format.md``, ``docs/bitsandbytes.md``, ``docs/architecture.md``). Someone who clones the
repository must be able to follow every citation, so this test reads every tracked (or untracked,
not ignored) text file under q4lab/, csrc/, tests/, bench/, notebooks/, docs/, tools/, binder/, .ci/
plus README.md and pyproject.toml, and fails, naming file and line, on
- a citation of the design notes that were never part of the repository (``DESIGN.md``, ``DESIGN
  §``, ``bnb-4bit-format.md``);
- a ``docs/<name>.md`` path that does not exist;
- a section ``docs/<name>.md §N`` whose number N is not a numbered heading of that file.

And docs/architecture.md §1 is the map of the code: it must name every module under ``q4lab/``
and every file under ``csrc/`` (the failure names each one missing and the line to add), and every
``q4lab/`` or ``csrc/`` path it names must exist.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["q4lab", "csrc", "tests", "bench", "notebooks", "docs", "tools", "binder", ".ci",
           "README.md", "pyproject.toml"]
# Built from pieces so that this file does not cite them itself.
OUTSIDE = re.compile("|".join([r"\bDESIGN" + r"\.md", r"\bDESIGN" + r"\s*§",
                               r"bnb-4bit-" + r"format(\.md)?"]))
DOCS_CITATION = re.compile(r"docs/([\w.-]+\.md)`{0,2}\s*(?:§\s*(\d+))?")
HEADING_NUMBER = re.compile(r"^#+\s+(\d+)\.", re.MULTILINE)


def scanned_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                          *SCANNED], cwd=ROOT, capture_output=True, text=True, check=True)
    files = []
    for rel in sorted(set(out.stdout.split())):
        path = ROOT / rel
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def section_numbers(doc: Path) -> set[int]:
    return {int(n) for n in HEADING_NUMBER.findall(doc.read_text())}


def bad_citations(path: Path, text: str) -> list[str]:
    rel = path.relative_to(ROOT)
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if path.name != Path(__file__).name:
            for m in OUTSIDE.finditer(line):
                found.append(f"{rel}:{lineno}: cites {m.group(0)!r}, "
                             "which is not in the repository")
        for m in DOCS_CITATION.finditer(line):
            doc = ROOT / "docs" / m.group(1)
            if not doc.is_file():
                found.append(f"{rel}:{lineno}: cites docs/{m.group(1)}, which does not exist")
            elif m.group(2) and int(m.group(2)) not in section_numbers(doc):
                found.append(f"{rel}:{lineno}: cites docs/{m.group(1)} §{m.group(2)}, which has "
                             f"no such numbered section")
    return found


def test_the_docs_exist():
    for name in ("format.md", "bitsandbytes.md", "architecture.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"
    assert section_numbers(ROOT / "docs" / "format.md") >= set(range(1, 10))


def test_no_citation_of_a_document_outside_the_repository():
    files = scanned_files()
    assert len(files) > 20, files  # the scan found the tree
    found = []
    for path in files:
        text = text_of(path)
        if text is not None:
            found += bad_citations(path, text)
    assert not found, f"{len(found)} citations of documents not in the repository:\n" + \
        "\n".join(found)


@pytest.mark.parametrize("line, problem", [
    ("see DESIGN" + ".md §4", "DESIGN"),
    ("(DESIGN" + " §7)", "DESIGN"),
    ("details in bnb-4bit-" + "format.md §8", "bnb-4bit"),
    ("see docs/" + "nowhere.md", "does not exist"),
    ("see `docs/format.md` §" + "99", "no such numbered section"),
])
def test_the_check_finds_each_kind(tmp_path, line, problem):
    """The scanner is not vacuous: each kind of bad citation is reported."""
    fake = ROOT / "tests" / "_fake_citing_file.py"
    assert not fake.exists()
    found = bad_citations(fake, f"x = 1\n{line}\n")
    assert len(found) == 1 and problem in found[0] and ":2:" in found[0], found


def test_good_citations_pass():
    ok = "see `docs/format.md` §6, ``docs/bitsandbytes.md`` §1-2 and docs/architecture.md"
    assert bad_citations(ROOT / "tests" / "x.py", ok) == []


# ---- docs/architecture.md §1 is the map of every module -----------------------------------------
ARCHITECTURE = ROOT / "docs" / "architecture.md"
NAMED_PATH = re.compile(r"`((?:q4lab|csrc)/[\w./*-]*)`")


def package_files() -> list[str]:
    """Every module of the package (``q4lab/**/*.py``) and every file in ``csrc/``, tracked or
    untracked (not ignored), as repository paths."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                          "q4lab", "csrc"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = []
    for rel in sorted(set(out.stdout.split())):
        path = ROOT / rel
        if not path.is_file() or path.is_symlink() or rel.startswith("q4lab/csrc/"):
            continue
        if rel.startswith("csrc/") or rel.endswith(".py"):
            found.append(rel)
    return found


def map_section(text: str) -> str:
    start = text.index("## 1.")
    return text[start:text.index("\n## 2.", start)]


def map_problems(text: str, files: list[str]) -> list[str]:
    """What is wrong with the map in ``text`` (the architecture page) for the package ``files``:
    a module or csrc file that §1 does not name, or a named q4lab/ or csrc/ path that is gone."""
    named = set(NAMED_PATH.findall(map_section(text)))
    problems = [f"docs/architecture.md §1 does not name {rel}: add a line "
                f"\"- `{rel}`: <what it holds>\" under its group" for rel in files
                if rel not in named]
    for rel in sorted(set(NAMED_PATH.findall(text))):
        if not (any(ROOT.glob(rel)) if "*" in rel else (ROOT / rel).exists()):
            problems.append(f"docs/architecture.md names {rel}, which does not exist: "
                            "remove or correct its line")
    return problems


def test_architecture_names_every_module_and_only_real_ones():
    files = package_files()
    assert "q4lab/nn.py" in files and "csrc/q4_element.h" in files, files  # the scan found them
    problems = map_problems(ARCHITECTURE.read_text(), files)
    assert not problems, "\n".join(problems)


def test_the_map_check_names_a_missing_and_a_stale_module():
    files = package_files()
    text = ARCHITECTURE.read_text().replace("`q4lab/metrics.py`", "`q4lab/metricz.py`", 1)
    problems = map_problems(text, files + ["q4lab/not_yet_written.py"])
    assert any(p.startswith("docs/architecture.md §1 does not name q4lab/not_yet_written.py: ")
               for p in problems), problems
    assert any("names q4lab/metricz.py, which does not exist" in p for p in problems), problems
    assert len(problems) == 3, problems  # and metrics.py is now unnamed
