"""What every bench script shares besides the machine record (bench/_machine.py): one timer and
one results writer.

- ``Stopwatch``: wall seconds (``time.perf_counter``) and process-CPU seconds
  (``time.process_time``, all threads) of a span; started when made (or on ``with``), read with
  ``stop()``. Given a CUDA device it calls ``torch.cuda.synchronize`` at both ends, so queued
  kernels are counted (the way ``torch.utils.benchmark.Timer`` does).
- ``timed(fn, repeats, warmup)``: ``fn()`` run ``warmup`` times untimed (first-touch allocations,
  lazy set-up, kernel builds), then ``repeats`` times; the median wall and CPU seconds and the
  fastest wall time. The median is what the scripts compare: the machine is shared, and one slow
  run must not decide a ratio.
- ``write_results(result, name)``: ``bench/results/<name>`` as indented JSON with a final newline
  (NumPy scalars written as floats); returns the path.
"""
from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def today() -> str:
    """The local date as YYYY-MM-DD, the suffix of the results files."""
    return dt.date.today().isoformat()


class Stopwatch:
    """Wall and process-CPU seconds from ``start()`` (called on creation) to ``stop()``."""

    def __init__(self, device=None):
        self.device = device
        self.wall_s = self.cpu_s = None
        self.start()

    def _sync(self) -> None:
        if self.device is not None and str(self.device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def start(self) -> Stopwatch:
        self._sync()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def stop(self) -> float:
        """Wall seconds since ``start()`` (also kept, with the CPU seconds, as attributes)."""
        self._sync()
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0
        return self.wall_s

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def timed(fn, repeats: int = 5, warmup: int = 1, device=None) -> dict:
    """Median wall and process-CPU seconds of ``fn()`` over ``repeats`` runs after ``warmup``
    untimed calls, and the fastest wall time."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one run")
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        clock = Stopwatch(device)
        fn()
        walls.append(clock.stop())
        cpus.append(clock.cpu_s)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "wall_min_s": min(walls)}


def write_results(result: dict, name: str, directory: Path | str = RESULTS) -> Path:
    """Write ``result`` to ``directory / name`` (default bench/results/) and return the path."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path
