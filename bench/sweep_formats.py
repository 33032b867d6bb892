"""Sweep: q4lab's MXFP4 / NVFP4 / Q4_0 / Q4_1 quantizers and Q4_K / IQ4_NL dequantizers against
their own implementations (torchao, the gguf package), byte for byte, on random and named
adversarial cases (``_format_parity.CATEGORIES``: rounding ties, a block max at exactly 6·2^e,
subnormal scales, zero blocks, rows not a multiple of the block, NaN/Inf, bf16 input, huge
values). Every case compares packed codes, block scales and the dequantized float32 values;
q4lab refusing a case counts only where the anchor refuses it or gives non-finite output.
Writes ``bench/results/sweep_formats_<backend>.json`` with per-format, per-category counts.

    python bench/sweep_formats.py --cases 10000            # per format, reference backend
    python bench/sweep_formats.py --cases 2000 --backend cpu
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

import _format_parity as fp
from _machine import machine

RESULTS = Path(__file__).resolve().parent / "results"


def sweep(quant_type: str, cases: int, backend: str, seed0: int = 0) -> dict:
    cats = fp.categories(quant_type)
    counts, failures = Counter(), []
    for i in tqdm(range(cases), desc=quant_type, mininterval=2):
        category = cats[i % len(cats)]
        case = fp.draw_case(seed0 + i, quant_type, category)
        result = fp.run_case(case, backend)
        counts[(category, result["status"])] += 1
        if result["status"] == "differ" and len(failures) < 20:
            failures.append({"seed": seed0 + i, "category": category, **result})
    by_category = {c: {s: counts[(c, s)] for s in ("equal", "refused", "differ")} for c in cats}
    return {"cases": cases, "differ": sum(v["differ"] for v in by_category.values()),
            "by_category": by_category, "failures": failures}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per format")
    parser.add_argument("--backend", default="reference", choices=("reference", "cpu"))
    parser.add_argument("--formats", nargs="*", default=list(fp.QUANTIZED + fp.DEQUANT_ONLY))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = {"machine": machine(), "backend": args.backend, "cases_per_format": args.cases,
              "formats": {q: sweep(q, args.cases, args.backend) for q in args.formats}}
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["total_differ"] = sum(r["differ"] for r in report["formats"].values())
    for q, r in report["formats"].items():
        refused = sum(v["refused"] for v in r["by_category"].values())
        print(f"{q:7s} {r['cases']:6d} cases: {r['differ']} differ, {refused} refused by both")
    out = Path(args.out) if args.out else RESULTS / f"sweep_formats_{args.backend}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
