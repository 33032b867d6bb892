"""q4lab's C++ kernels against bitsandbytes and torchao, side by side in one process (CPU).

Workload (QLoRA's defaults): a 4096x4096 bfloat16 weight, NF4, blocksize 64, double quantization.
- quantize: q4lab.quantize_4bit(backend="cpu") vs bitsandbytes.functional.quantize_4bit
  (compress_statistics=True, CPU path) vs torchao's to_nf4 (block 64, scaler block 256);
- dequantize to bf16: q4lab.dequantize_4bit vs bitsandbytes.functional.dequantize_4bit;
- elements/s and the fraction of this machine's copy bandwidth (a torch clone of the same bytes,
  timed in the same run); 4 M vs 64 M elements to show linear growth; memory beyond the outputs.
Rules after llm.c dev/cuda: validate before timing (q4lab == reference bytes), warm up, median of
repeats. Wall time and process CPU time are both recorded (shared machines are noisy).

    python bench/bench_quant.py            # writes bench/results/cpu_<date>.json
"""
from __future__ import annotations

import os
import warnings

import torch

import q4lab
from q4lab import reference as ref
from q4lab.testing import assert_bytes_equal, byte_mismatch

import _harness as harness
from _harness import today, write_results
from _machine import machine

REPEATS = int(os.environ.get("Q4LAB_BENCH_REPEATS", "7"))


def timed(fn, repeats: int = REPEATS) -> dict:
    """Median wall and process-CPU seconds of ``fn()`` after one warm-up call (_harness.timed)."""
    return harness.timed(fn, repeats, warmup=1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocated_by(fn) -> int:
    """Bytes torch's CPU allocator handed out during ``fn()``: the profiler's self (not nested)
    allocations of every op, transient ones included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def validate(w: torch.Tensor) -> dict:
    """q4lab C++ == reference, byte for byte, on the benchmark tensor; bnb bytes compared too."""
    packed, state = q4lab.quantize_4bit(w, 64, "nf4", True, backend="cpu")
    x = w.float().numpy()
    p_ref, s_ref = ref.quantize_4bit(x, 64, "nf4", True, dtype="bfloat16")
    assert_bytes_equal(p_ref, packed, "packed vs reference")
    assert_bytes_equal(s_ref.absmax, state.absmax, "nested codes vs reference")
    assert_bytes_equal(s_ref.state2.absmax, state.state2.absmax, "absmax2 vs reference")
    out = q4lab.dequantize_4bit(packed, state, backend="cpu")
    want = torch.from_numpy(ref.dequantize_4bit(p_ref, s_ref, "bfloat16")).to(torch.bfloat16)
    assert_bytes_equal(want, out, "dequantized bf16 vs reference")
    import bitsandbytes.functional as bnbf

    p_bnb, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return {"q4lab_vs_reference": "0 bytes differ (packed, codes, absmax2, bf16 dequant)",
            "q4lab_vs_bnb_packed": byte_mismatch(p_bnb.reshape(-1), packed) or "identical"}


def bench_quantize(w: torch.Tensor) -> dict:
    import bitsandbytes.functional as bnbf
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    n = w.numel()
    rows = {
        "q4lab": timed(lambda: q4lab.quantize_4bit(w, 64, "nf4", True, backend="cpu")),
        "bitsandbytes": timed(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                         compress_statistics=True), 3),
        "torchao_to_nf4": timed(lambda: to_nf4(w, 64, 256), 3),
        "torch_clone_bf16": timed(lambda: w.clone()),
    }
    dst = torch.empty_like(w)
    rows["torch_copy_into_bf16"] = timed(lambda: dst.copy_(w))
    for r in rows.values():
        r["elements_per_s"] = n / r["wall_s"]
    return rows


def bench_dequantize(w: torch.Tensor) -> dict:
    import bitsandbytes.functional as bnbf

    packed, state = q4lab.quantize_4bit(w, 64, "nf4", True, backend="cpu")
    p_bnb, s_bnb = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    rows = {
        "q4lab": timed(lambda: q4lab.dequantize_4bit(packed, state, torch.bfloat16, "cpu")),
        "bitsandbytes": timed(lambda: bnbf.dequantize_4bit(p_bnb, s_bnb), 5),
    }
    for r in rows.values():
        r["elements_per_s"] = w.numel() / r["wall_s"]
    return rows


def kernels_only(w: torch.Tensor) -> dict:
    """The ops writing into preallocated outputs (no fresh pages to fault in): kernel cost alone."""
    q = torch.ops.q4lab
    flat = w.reshape(-1)
    packed, absmax = q.quantize_4bit(flat, 64, "nf4")
    codes, absmax2, off = q.quantize_absmax(absmax, None)
    out = torch.empty_like(flat)
    rows = {
        "quantize_4bit_out": timed(lambda: q.quantize_4bit_out(flat, 64, "nf4", packed, absmax)),
        "quantize_absmax_out": timed(lambda: q.quantize_absmax_out(
            absmax, None, codes, absmax2, torch.empty((), dtype=torch.float32))),
        "dequantize_4bit_out_bf16": timed(lambda: q.dequantize_4bit_out(
            packed, absmax, 64, "nf4", flat.numel(), out)),
    }
    for r in rows.values():
        r["elements_per_s"] = w.numel() / r["wall_s"]
    return rows


def single_thread(w: torch.Tensor) -> dict:
    """Quantize/dequantize ratios with one torch thread (on a busy 2-core machine two threads
    mostly wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"quantize": bench_quantize(w), "dequantize_bf16": bench_dequantize(w)}
    finally:
        torch.set_num_threads(threads)


def scaling() -> dict:
    """4 M vs 64 M elements, one thread; the ratio uses process CPU time (robust to sharing)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows, cols in ((2048, 2048), (8192, 8192)):
            w = torch.randn(rows, cols).to(torch.bfloat16)
            t = timed(lambda w=w: q4lab.quantize_4bit(w, 64, "nf4", True, backend="cpu"), 5)
            out[f"{rows * cols}"] = {**t, "elements_per_s": w.numel() / t["wall_s"]}
    finally:
        torch.set_num_threads(threads)
    small, large = (out[k] for k in list(out))
    out["cpu_time_ratio_64M_over_4M"] = large["cpu_s"] / small["cpu_s"]  # 16 = linear
    out["wall_time_ratio_64M_over_4M"] = large["wall_s"] / small["wall_s"]
    return out


def memory(w: torch.Tensor) -> dict:
    """Temporaries beyond the outputs: torch allocations (profiler) and the RSS delta."""
    def quantize():
        return q4lab.quantize_4bit(w, 64, "nf4", True, backend="cpu")

    packed, state = quantize()
    outputs = packed.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes + 4
    allocated = allocated_by(quantize)
    del packed, state
    before = rss_bytes()
    kept = quantize()
    rss_delta = rss_bytes() - before
    del kept
    return {"output_bytes": outputs, "torch_allocated_bytes": allocated,
            "extra_bytes": allocated - outputs, "extra_le_output": allocated - outputs <= outputs,
            "float32_absmax_intermediate_bytes": (w.numel() // 64) * 4,
            "rss_delta_bytes": rss_delta,
            "note": "extra = the float32 absmax (input of double quant) and ops.py's isfinite "
                    "check on it; the kernels' own scratch is on the stack (<= one block per "
                    "thread) plus 2 KiB of exponent bins per 65536 blocks"}


def main() -> dict:
    warnings.filterwarnings("ignore")
    assert q4lab.backends()["cpu"] is True, q4lab.backends()
    torch.manual_seed(0)
    w = (torch.randn(4096, 4096) * 0.02).to(torch.bfloat16)
    result = {"machine": machine(), "workload": "4096x4096 bf16, nf4, blocksize 64, double quant"}
    result["validation"] = validate(w)
    result["quantize"] = q = bench_quantize(w)
    result["dequantize_bf16"] = d = bench_dequantize(w)
    result["kernels_into_preallocated"] = kernels_only(w)
    result["one_thread"] = one = single_thread(w)
    result["scaling"] = scaling()
    result["memory"] = memory(w)
    copy = q["torch_clone_bf16"]["wall_s"]
    result["ratios"] = {
        "quantize_vs_bnb": q["bitsandbytes"]["wall_s"] / q["q4lab"]["wall_s"],
        "quantize_vs_torchao": q["torchao_to_nf4"]["wall_s"] / q["q4lab"]["wall_s"],
        "dequantize_vs_bnb": d["bitsandbytes"]["wall_s"] / d["q4lab"]["wall_s"],
        "quantize_fraction_of_clone_time": copy / q["q4lab"]["wall_s"],
        "dequantize_fraction_of_clone_time": copy / d["q4lab"]["wall_s"],
        "one_thread_quantize_vs_bnb": one["quantize"]["bitsandbytes"]["wall_s"]
        / one["quantize"]["q4lab"]["wall_s"],
        "one_thread_quantize_vs_torchao": one["quantize"]["torchao_to_nf4"]["wall_s"]
        / one["quantize"]["q4lab"]["wall_s"],
        "one_thread_dequantize_vs_bnb": one["dequantize_bf16"]["bitsandbytes"]["wall_s"]
        / one["dequantize_bf16"]["q4lab"]["wall_s"],
    }
    return result


def report(result: dict) -> None:
    print(f"machine: {result['machine']}")
    print(f"validation: {result['validation']}")
    sections = [("quantize", result["quantize"]), ("dequantize_bf16", result["dequantize_bf16"]),
                ("kernel (prealloc)", result["kernels_into_preallocated"]),
                ("1 thread quantize", result["one_thread"]["quantize"]),
                ("1 thread dequant", result["one_thread"]["dequantize_bf16"])]
    for section, rows in sections:
        for name, r in rows.items():
            print(f"{section:18s} {name:26s} {r['wall_s'] * 1e3:9.2f} ms wall "
                  f"{r['cpu_s'] * 1e3:9.2f} ms cpu  {r['elements_per_s'] / 1e9:7.3f} G elem/s")
    s = result["scaling"]
    print(f"scaling: 64M/4M cpu-time ratio {s['cpu_time_ratio_64M_over_4M']:.2f}, wall "
          f"{s['wall_time_ratio_64M_over_4M']:.2f} (16 = linear)")
    print(f"memory: {result['memory']}")
    for k, v in result["ratios"].items():
        print(f"{k:36s} {v:8.2f}x")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    res = main()
    report(res)
    path = write_results(res, f"cpu_{today()}.json")
    print(f"wrote {path}")
