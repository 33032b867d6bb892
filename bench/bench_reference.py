"""Time the NumPy reference against bitsandbytes' CPU path on the same input, in one process.

Issue 2's bar: ``q4lab.reference.quantize_4bit`` (NF4, double quant, blocksize 64) on a 4096x4096
float32 tensor is no slower than ``bitsandbytes.functional.quantize_4bit`` on the CPU. Outputs are
validated first (NF4 packed bytes and absmax identical), then each side is timed as the median of
``--repeats`` runs after a warm-up, and the ratio printed. Writes
bench/results/reference_cpu_<date>.json.

    python bench/bench_reference.py [--size 4096] [--repeats 5]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from q4lab import reference as ref
from q4lab.testing import assert_bytes_equal

from _harness import RESULTS, timed, today, write_results
from _machine import machine


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds after one warm-up call (first-touch allocations, bnb's lazy setup)."""
    return timed(fn, repeats, warmup=1)["wall_s"]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32)
    xt = torch.from_numpy(x)
    n = x.size

    packed_b, state_b = bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4",
                                           compress_statistics=False)
    packed_q, state_q = ref.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert_bytes_equal(packed_b, packed_q, "validation: packed")
    assert_bytes_equal(state_b.absmax, state_q.absmax, "validation: absmax")

    t_ref = median_seconds(lambda: ref.quantize_4bit(x, 64, "nf4", double_quant=True), args.repeats)
    t_bnb = median_seconds(lambda: bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4",
                                                      compress_statistics=True), args.repeats)
    result = {
        "what": f"quantize {args.size}x{args.size} float32, NF4, double quant, blocksize 64",
        "reference_s": t_ref, "bnb_cpu_s": t_bnb,
        "reference_elements_per_s": n / t_ref, "bnb_cpu_elements_per_s": n / t_bnb,
        "speedup_reference_over_bnb": t_bnb / t_ref,
        "machine": machine(),
    }
    print(f"{result['what']}")
    print(f"  q4lab reference : {t_ref * 1e3:8.1f} ms  {n / t_ref / 1e6:7.1f} M elements/s")
    print(f"  bitsandbytes CPU: {t_bnb * 1e3:8.1f} ms  {n / t_bnb / 1e6:7.1f} M elements/s")
    print(f"  ratio (bnb time / reference time): {t_bnb / t_ref:.2f}x")
    path = write_results(result, f"reference_cpu_{today()}.json", args.out)
    print(f"  wrote {path}")
    return result


if __name__ == "__main__":
    main()
