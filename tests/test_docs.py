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
