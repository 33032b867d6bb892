"""Where a benchmark ran, for its JSON in bench/results/: the UTC date, the CPU model, cores, torch
threads, the 1/5/15-minute load average when it is called, and the versions of python, numpy, torch,
q4lab and of the peers q4lab is measured against (bitsandbytes, torchao, transformers; None when
not installed). Versions come from the installed packages' metadata, so nothing extra is imported.
Every bench script records this dict under "machine" and adds its own fields as keywords.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "torch", "q4lab", "bitsandbytes", "torchao", "transformers")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(**extra) -> dict:
    import torch

    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "python": platform.python_version(), **{p: version(p) for p in PACKAGES}}
    out.update(extra)
    return out
