"""The fused 4-bit matmul on a CUDA GPU: parity with the spec, then the fraction of DRAM read
bandwidth the one-row GEMV reaches (issue 21, "4-bit inference toward the bandwidth limit", item 5).

Parity first (llm.c's rule: validate before timing): the CUDA kernel (``csrc/q4_matmul_cuda.cu``,
order pair-chain-v2) must equal ``q4lab.reference.matmul_4bit`` byte for byte on a few shapes,
including K % B != 0 and odd K. Then it cycles through distinct NF4 + double-quant (blocksize 64)
layers whose packed bytes add up to at least 4x the GPU's L2 cache, one input row (float32 and
bf16), timed with CUDA events, beside the yardstick ``torch.sum`` over a float32 tensor of the same
size and beside bf16 ``F.linear`` (cuBLAS) on the same shape. The roofline fraction counts the
bytes the kernel must read (packed codes, 8-bit absmax codes, absmax2, x). Writes
bench/results/matmul_gpu_<date>.json. One command on a GPU machine (docs/architecture.md):

    python -m pytest -q tests/test_matmul.py -k cuda && python bench/bench_matmul_gpu.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import q4lab
from q4lab.testing import assert_bytes_equal

from _machine import machine

RESULTS = Path(__file__).resolve().parent / "results"


def parity() -> list[str]:
    checked = []
    g = torch.Generator().manual_seed(0)
    for n, k, bs in ((64, 4096, 64), (33, 100, 64), (40, 1536, 128), (7, 33, 32), (128, 576, 64)):
        w = torch.randn(n, k, generator=g)
        packed, state = q4lab.quantize_4bit(w, bs, "nf4", True)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(3, k, generator=g).to(dtype)
            expected = q4lab.matmul_4bit(x, packed, state, backend="reference")
            got = q4lab.matmul_4bit(x.cuda(), packed.cuda(), state.to("cuda"), backend="cuda")
            assert_bytes_equal(expected, got.cpu(), f"cuda ({n},{k}) bs{bs} {dtype}")
            checked.append(f"({n},{k}) bs{bs} {dtype}")
    return checked


def event_seconds(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_matmul_gpu needs a CUDA GPU"
    checked = parity()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    n, k = args.n, args.k
    layer_bytes = n * k // 2
    count = max(2, -(-4 * l2 // layer_bytes))
    layers = []
    for _ in range(count):
        packed, state = q4lab.quantize_4bit(torch.randn(n, k, device="cuda"), 64, "nf4", True)
        layers.append((packed, state))
    read = layer_bytes + n * k // 64 + 4 * (n * k // 64 // 256) + 4 * k
    big = torch.rand(count * layer_bytes // 4, device="cuda")
    sum_s = event_seconds(lambda: big.sum())
    sum_bw = big.numel() * 4 / sum_s
    out = {"shape": [n, k], "layers": count, "parity_checked": checked, "sum_GBps": sum_bw / 1e9}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        t = event_seconds(lambda x=x: [q4lab.matmul_4bit(x, p, s) for p, s in layers]) / count
        name = str(dtype).replace("torch.", "")
        out[f"fused_{name}_us"] = t * 1e6
        out[f"fused_{name}_fraction_of_sum"] = read / t / sum_bw
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
           for _ in range(max(2, count // 4))]
    x16 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t16 = event_seconds(lambda: [F.linear(x16, w) for w in w16]) / len(w16)
    out["bf16_linear_us"] = t16 * 1e6
    out["bf16_linear_fraction_of_sum"] = n * k * 2 / t16 / sum_bw
    out["fused_bf16_vs_bf16_linear"] = t16 / out["fused_bfloat16_us"]
    result = {"machine": machine(gpu=torch.cuda.get_device_name(0)), **out}
    for key, value in out.items():
        if key != "parity_checked":
            print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"matmul_gpu_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
