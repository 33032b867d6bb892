"""A private JupyterLab for the real-browser tests (tests/test_browser.py,
tests/test_browser_quality_lab.py): Debian's Chromium and its flags, and a server on 127.0.0.1 with
a free port, a random token, ``--allow-root``, a fresh workspace directory and the app exposed to
the page (``window.jupyterapp``) so a test can drive it. Not a test module (no ``test_`` prefix).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyter_lab(root: Path, **env_extra):
    """Run JupyterLab over ``root`` (its log in root/lab.log) until the block ends; yields
    (base_url, token). ``env_extra``: environment variables for the server and its kernels."""
    port, token = free_port(), secrets.token_hex(16)
    workspaces = root / ".workspaces"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
               **env_extra)
    logfile = root / "lab.log"
    with open(logfile, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
             "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
             f"--LabApp.workspaces_dir={workspaces}"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(base, token, proc, logfile)
            yield base, token
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_server(base: str, token: str, proc, logfile: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited: {logfile.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not start in {timeout}s: {logfile.read_text()[-2000:]}")
