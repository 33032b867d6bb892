"""A large randomized sweep of the fused matmul: every compiled CPU form of ``torch.ops.q4lab.
matmul_4bit`` (portable, table, rows, permute; rows and permute on the stored bytes and on their
decode layout ``q4lab.matmul.repack_rows``) against the NumPy spec
``q4lab.reference.matmul_4bit``, byte for byte, at 1 and 2 threads (docs/format.md §12-§16,
order pair-chain-v2).

Each case draws a shape (rows N 1-80, columns K 1-320 with a bias toward multiples of 32, where the
fast forms run; one case in 20 a layer of 64-320 rows by 64-2048 columns, large enough that the
rows form splits it over 2 threads), a blocksize 32-512, a quant type, nesting, an input dtype,
0-4 input rows, a bias
or not, and a weight scale spanning 2^-20 to 2^20 (with all-zero rows now and then). Mismatches are
reported with case, form and "k/n bytes differ, first at i". Writes
bench/results/sweep_matmul_cpu.json.

    python bench/sweep_matmul.py [--cases 100000] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm.auto import tqdm

import q4lab
from q4lab import matmul as fused
from q4lab.constants import BLOCKSIZES, QUANT_TYPES
from q4lab.testing import byte_mismatch

from _harness import Stopwatch, write_results
from _machine import machine
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def draw_case(rng: np.random.Generator):
    if rng.random() < 0.05:
        n, k = int(rng.integers(64, 321)), int(rng.integers(1, 33)) * 64
    else:
        n = int(rng.integers(1, 81))
        k = int(rng.integers(1, 11)) * 32 if rng.random() < 0.6 else int(rng.integers(1, 321))
    blocksize = int(rng.choice(BLOCKSIZES[:5]))
    quant_type = str(rng.choice(QUANT_TYPES))
    nested = bool(rng.random() < 0.5)
    scale = float(2.0 ** rng.integers(-20, 21))
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * scale)
    if rng.random() < 0.1:
        w[int(rng.integers(0, n))] = 0.0
    dtype = DTYPES[int(rng.integers(0, 3))]
    rows = int(rng.integers(0, 5))
    x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32)).to(dtype)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype) \
        if rng.random() < 0.5 else None
    packed, state = q4lab.quantize_4bit(w, blocksize, quant_type, nested)
    desc = (f"({n},{k}) bs{blocksize} {quant_type} dq={nested} {dtype} rows={x.shape[0]} "
            f"bias={bias is not None}")
    return desc, x, packed, state, bias


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    assert q4lab.backends()["cpu"] is True, q4lab.backends()
    rng = np.random.default_rng(args.seed)
    isas = fused.isas()
    mismatches, compared, clock = [], 0, Stopwatch()
    for case in tqdm(range(args.cases), desc="matmul_4bit sweep", unit="case", mininterval=5):
        desc, x, packed, state, bias = draw_case(rng)
        expected = fused.matmul_4bit(x, packed, state, bias, backend="reference")
        threads = 1 + case % 2
        torch.set_num_threads(threads)
        for isa in isas:
            msg = byte_mismatch(expected, fused._kernel(x, packed, state, bias, isa))
            compared += 1
            if msg is not None:
                mismatches.append(f"case {case} {desc} isa={isa} threads={threads}: {msg}")
        layout_forms = [f for f in isas if f in fused.DECODE_LAYOUT_FORMS]
        if layout_forms and state.shape[1] % state.blocksize == 0:
            decode_args = fused.repack_rows(packed, state) + (None, None) + \
                fused.kernel_args(packed, state)[4:]
            for form in layout_forms:
                msg = byte_mismatch(expected,
                                    torch.ops.q4lab.matmul_4bit(x, *decode_args, bias, form))
                compared += 1
                if msg is not None:
                    mismatches.append(f"case {case} {desc} {form} decode layout "
                                      f"threads={threads}: {msg}")
    seconds = clock.stop()
    result = {"machine": machine(), "cases": args.cases, "seed": args.seed, "isas": isas,
              "comparisons": compared,
              "mismatches": len(mismatches), "first_mismatches": mismatches[:20],
              "seconds": round(seconds, 1)}
    write_results(result, "sweep_matmul_cpu.json")
    print(f"{args.cases} cases x {len(isas)} forms: {len(mismatches)} mismatches "
          f"in {seconds:.0f} s")
    for m in mismatches[:20]:
        print("  ", m)
    return result


if __name__ == "__main__":
    main()
