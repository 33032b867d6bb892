"""Large random sweep: the C++ kernels against the NumPy reference, byte for byte (docs/format.md).

Each case draws a length, blocksize, quant type, input dtype, double quant on/off, output dtype and
a value distribution (Gaussian at random scales, values on the thresholds and ±1 ulp, subnormals,
huge magnitudes, signed zeros, mixtures), then compares packed bytes, absmax or nested codes,
absmax2, offset and the dequantized output. A mismatch is recorded with its seed so it can be
replayed (``--replay SEED``). The summary goes to ``bench/results/sweep_cpu.json``.

    python bench/sweep_parity.py --cases 100000
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from q4lab import _kernels
from q4lab.constants import BLOCKSIZES, DTYPES, QUANT_TYPES
from q4lab.testing import boundary_values, parity_mismatches, round_to_dtype

from _harness import RESULTS, Stopwatch, write_results
from _machine import machine
KINDS = ("normal", "boundary", "subnormal", "huge", "zeros", "mixed")


def draw_case(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    blocksize = int(rng.choice(BLOCKSIZES))
    quant_type = str(rng.choice(QUANT_TYPES))
    n = int(rng.integers(1, 4 * blocksize)) if rng.random() < 0.9 else int(rng.integers(1, 40_000))
    kind = str(rng.choice(KINDS))
    dtype = str(rng.choice(DTYPES))
    x = np.clip(draw_values(rng, kind, n, quant_type), -3e38, 3e38)  # finite in float32
    if dtype == "float16":
        x = np.clip(x, -65504, 65504)
    x = round_to_dtype(x.astype(np.float32), dtype)
    return {"seed": seed, "x": x, "blocksize": blocksize, "quant_type": quant_type, "dtype": dtype,
            "kind": kind, "double_quant": bool(rng.random() < 0.7),
            "out_dtype": str(rng.choice(DTYPES))}


def draw_values(rng, kind: str, n: int, quant_type: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        if kind == "normal":
            return rng.standard_normal(n) * 10.0 ** rng.integers(-35, 35)
        if kind == "boundary":
            x = rng.choice(boundary_values(quant_type), n).astype(np.float64)
            x[:: int(rng.choice([32, 64]))] = rng.choice([1.0, -1.0])
            return x * (2.0 ** int(rng.integers(-20, 20)) if rng.random() < 0.3 else 1.0)
        if kind == "subnormal":
            return rng.standard_normal(n) * rng.choice([1e-45, 1e-43, 1e-40, 2.0**-126, 2.0**-120])
        if kind == "huge":
            return np.clip(rng.standard_normal(n) * rng.choice([2.0**120, 2.0**126, 1e38]),
                           -3.4e38, 3.4e38)
        if kind == "zeros":
            return np.where(rng.random(n) < 0.5, 0.0, -0.0)
    x = rng.standard_t(3, n) * 0.02
    x[rng.random(n) < 0.1] = 0.0
    x[rng.random(n) < 0.05] *= 1e-39
    return x


def compare(case: dict) -> str | None:
    """None if every output matches, else the first mismatch (``q4lab.testing.parity_mismatches``:
    packed, state, offset, nested and decoded absmax, the dequantized output)."""
    found = parity_mismatches(case["x"], case["dtype"], case["blocksize"], case["quant_type"],
                              case["double_quant"], backend="cpu", out_dtypes=(case["out_dtype"],))
    return next((f"{name}: {msg}" for name, msg in found.items()), None)


def summary(args, counts: dict, failures: list, seconds: float) -> dict:
    return {"cases": args.cases, "first_seed": args.seed, "mismatching_cases": len(failures),
            "failures": failures[:20], "seconds": round(seconds, 1), "counts": counts,
            "machine": machine()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=int, default=None, help="run one case by its seed")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_cpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    assert _kernels.available("cpu") is True, _kernels.available("cpu")
    if args.replay is not None:
        case = draw_case(args.replay)
        print({k: v for k, v in case.items() if k != "x"}, "n =", case["x"].size)
        print(compare(case) or "identical")
        return 0
    counts: dict = {}
    failures: list = []
    clock = Stopwatch()
    for seed in tqdm(range(args.seed, args.seed + args.cases), desc="reference vs C++"):
        case = draw_case(seed)
        key = f"{case['quant_type']}/{case['kind']}"
        counts[key] = counts.get(key, 0) + 1
        msg = compare(case)
        if msg:
            failures.append({"seed": seed, "mismatch": msg})
    result = summary(args, counts, failures, clock.stop())
    write_results(result, args.out.name, args.out.parent)
    print(f"{args.cases} cases, {len(failures)} mismatching; wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
