"""Seconds per control change of ``q4lab.widgets.quality_lab`` on SmolLM2-135M (issue 13's target:
<= 10 s per change on the 2-core CPU machine). A benchmark figure, not a timed test.

Builds the lab (default 1024 tokens of the Apache License 2.0 passage, 12 generated tokens), then
makes ``--changes`` control changes from Python, each to a configuration not seen before (so none
is served from the cache): every change requantizes the float model with q4lab's kernel, scores
the passage, generates the continuation and redraws. Reports wall seconds per change (median and
max) and the per-step split (quantize / perplexity / continuation) from the lab's own timings.
The machine may be shared: the 1-minute load average before and after is recorded, with the CPU
count and torch's thread count, because a loaded 2-core machine can be many times slower (two
torch threads that other processes keep descheduling wait on each other: ``--threads 1`` suffers
far less). The CPU seconds this process used per change are recorded too: with one thread they are
what the change costs on a quiet core, whatever the load.

Writes JSON to ``bench/results/quality_lab_cpu_<date>.json`` (date, versions, machine, load,
timings). Usage: ``python bench/bench_quality_lab.py [--tokens 1024] [--new-tokens 12]
[--changes 8] [--threads N] [--out PATH]``. Method: ``q4lab/quality.py``; widget conventions:
``docs/architecture.md`` §4.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _harness import RESULTS, Stopwatch, today, write_results
from _machine import machine

ROOT = Path(__file__).resolve().parents[1]

#: (control, value) in order; each lands on a configuration the lab has not evaluated yet.
CHANGES = (("quant_type", "fp4"), ("double_quant", False), ("quant_type", "int4"),
           ("quant_type", "nf4"), ("blocksize", 256), ("blocksize", 4096), ("layers", "attention"),
           ("layers", "mlp"), ("lm_head", True), ("compute_dtype", "bfloat16"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--changes", type=int, default=8, choices=range(1, len(CHANGES) + 1))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                    "torch's own)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from q4lab import widgets

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with Stopwatch() as clock:
        lab = widgets.quality_lab(tokens=args.tokens, new_tokens=args.new_tokens)
    build = clock.wall_s
    print(f"built the lab in {build:.1f} s (model load, float evaluation, first configuration)")
    changes = []
    for control, value in CHANGES[:args.changes]:
        n = len(lab.history)
        with Stopwatch() as clock:
            getattr(lab, control).value = value
        wall, cpu = clock.wall_s, clock.cpu_s
        assert len(lab.history) == n + 1, f"{control}={value!r} did not add a new configuration"
        rec = lab.current
        changes.append({"control": control, "value": value, "label": rec["label"],
                        "seconds": wall, "cpu_seconds": cpu, "steps": rec["seconds"],
                        "perplexity": rec["perplexity"], "bits_per_param": rec["bits_per_param"],
                        "model_bytes": rec["model_bytes"]})
        print(f"{control}={value!r:<12} -> {rec['label']:<24} {wall:6.2f} s  (quantize "
              f"{rec['seconds']['quantize']:.2f}, perplexity {rec['seconds']['perplexity']:.2f}, "
              f"continuation {rec['seconds']['continuation']:.2f}; {cpu:.2f} CPU s)  "
              f"ppl {rec['perplexity']:.3f}")
    secs = [c["seconds"] for c in changes]
    load_after = os.getloadavg()
    result = {
        "benchmark": "quality_lab seconds per control change", "target_seconds": 10.0,
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "model": "SmolLM2-135M-Instruct (q4lab.models.load_smollm2, float32)",
        "tokens": lab.ids.numel(), "new_tokens": args.new_tokens,
        "float_perplexity": lab.float_record["perplexity"], "build_seconds": build,
        "median_seconds": statistics.median(secs), "max_seconds": max(secs),
        "median_cpu_seconds": statistics.median(c["cpu_seconds"] for c in changes),
        "changes": changes,
    }
    print(f"median {result['median_seconds']:.2f} s, max {result['max_seconds']:.2f} s per change "
          f"(target <= 10 s), median {result['median_cpu_seconds']:.2f} CPU s; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    out = Path(args.out) if args.out else RESULTS / f"quality_lab_cpu_{today()}.json"
    out = write_results(result, out.name, out.parent)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
