"""One-row 4-bit inference: q4lab's fused ``matmul_4bit`` against dequantize + ``F.linear``, float32
``F.linear`` and bitsandbytes' ``matmul_4bit``, SmolLM2-135M and a synthetic 1.1B Llama greedy
decode, in one process (issue 21: GEMV toward the bandwidth limit; parts in bench/_infer_parts.py).

Part 0 (issue 21): 12 distinct 4096x4096 NF4+DQ layers, one row, float32 and bf16, every CPU form
of the kernel (`rows`, AVX2, and `permute`, AVX-512F, on the decode layout; a `permute` that is not
native here is not timed), as a fraction of torch.sum's bandwidth,
beside the inner loop's in-cache ceiling; then the fused/dequantize crossover per form
(``--write-crossover`` regenerates q4lab/_crossover.py, the committed table Linear4bit reads).

Issue "Fused 4-bit inference". Decode multiplies one row by every weight once per token, so its
speed is set by the bytes it reads; the yardstick is the read bandwidth ``torch.sum`` reaches in the
same run. Part 1 cycles through distinct NF4 + double-quant (blocksize 64) layers of shapes
4096x4096 and 11008x4096 / 4096x11008 whose packed bytes add up to at least twice the last-level
cache (read from sysfs), so no layer is served from cache; the float32 layers cycle likewise.
Every method is validated before it is timed (llm.c's rule): q4lab's kernel must equal the NumPy
spec byte for byte on the first layer, and every method must agree with float64 x @ W_hat.T.
Part 2 decodes with a KV cache (greedy, batch 1), splits each model's time per token into linear
layers, lm_head and everything else (forward hooks, one extra decode), and compares q4lab's fused
and dequantize paths' continuations on a few prompts. Note: bitsandbytes 0.50.2's fused CPU kernel
needs an AVX512-BF16 CPU and its ``kernels`` package from a model hub; without it (as here) bnb
dequantizes per call. Writes bench/results/infer_<device>_<date>.json.

    python bench/bench_infer.py [--cycle-mib N] [--tokens 48] [--skip-model] [--compile]
        [--skip-layers] [--skip-1b] [--tokens-1b 16] [--write-crossover]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import q4lab
from q4lab import _build, decode_groups
from q4lab import matmul as fused
from q4lab.testing import assert_bytes_equal

from _harness import today, write_results
from _machine import machine
import _infer_parts as parts

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a neural network is in one sentence."]


def last_level_cache_bytes() -> int:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 << 20)


def read_bandwidth(nbytes: int) -> float:
    """Bytes/s of torch.sum over a float32 tensor of ``nbytes`` (best of 5)."""
    big = torch.rand(nbytes // 4)
    best = min(_seconds(lambda: big.sum()) for _ in range(5))
    return big.numel() * 4 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_layers(total_bytes: int, bytes_of, build) -> list:
    """Layers of SHAPES in turn until their bytes (``bytes_of(shape)``) reach ``total_bytes``."""
    layers, size, i = [], 0, 0
    while size < total_bytes:
        shape = SHAPES[i % len(SHAPES)]
        layers.append(build(shape, i))
        size += bytes_of(shape)
        i += 1
    return layers


def weight(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def bnb_state(state):
    """The same bytes as a bitsandbytes QuantState (q4lab's storage is bnb's)."""
    import bitsandbytes.functional as bF

    nested = bF.QuantState(absmax=state.state2.absmax, code=state.state2.code, blocksize=256,
                           dtype=torch.float32)
    return bF.QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=state.code,
                         blocksize=state.blocksize, quant_type=state.quant_type,
                         dtype=torch.float32, offset=state.offset.reshape(()), state2=nested)


def cycle_time(layers, call, passes: int) -> float:
    """Median seconds per layer over ``passes`` passes through the cycle (after one warm pass)."""
    for layer in layers[: max(1, len(layers) // 4)]:
        call(layer)
    per_pass = [_seconds(lambda: [call(layer) for layer in layers]) / len(layers)
                for _ in range(passes)]
    return float(np.median(per_pass))


def validate(x, packed, state, w_hat64, name, y) -> float:
    exact = (x.double() @ w_hat64.T)
    err = float((y.double() - exact).abs().max() / exact.abs().max())
    assert err < 1e-4, f"{name}: relative error {err:.2e} against float64 x @ W_hat.T"
    return err


def bench_layers(cycle_bytes: int, bandwidth: float) -> dict:
    print(f"building a cycle of >= {cycle_bytes / 2**20:.0f} MiB of 4-bit layers ...", flush=True)
    quantized = make_layers(cycle_bytes, lambda s: s[0] * s[1] // 2,
                            lambda s, i: q4lab.quantize_4bit(weight(s, i)))
    n_weights = sum(p.numel() * 2 for p, _ in quantized)
    stored = sum(sum(q4lab.storage_bytes(s).values()) for p, s in quantized) / len(quantized)
    packed_per_layer = n_weights / 2 / len(quantized)
    x = torch.randn(1, 4096)
    xs = {4096: x, 11008: torch.randn(1, 11008)}

    # validate on the first layer of each shape before timing anything
    errors = {}
    import bitsandbytes as bnb
    for p, s in quantized[: len(SHAPES)]:
        xi = xs[s.shape[1]]
        assert_bytes_equal(fused.matmul_4bit(xi, p, s, backend="reference"),
                           q4lab.matmul_4bit(xi, p, s), f"fused kernel vs spec {tuple(s.shape)}")
        w_hat = q4lab.dequantize_4bit(p, s, torch.float32)
        w64 = w_hat.double()
        errors[str(tuple(s.shape))] = {
            "q4lab_fused": validate(xi, p, s, w64, "fused", q4lab.matmul_4bit(xi, p, s)),
            "dequantize_linear": validate(xi, p, s, w64, "dequant", F.linear(xi, w_hat)),
            "bitsandbytes": validate(xi, p, s, w64, "bnb", bnb.matmul_4bit(xi, p.view(-1, 1).t(),
                                                                            bnb_state(s))),
        }
    results = {"validation_relative_error": errors, "layers_in_cycle": len(quantized),
               "packed_mib_in_cycle": n_weights / 2 / 2**20}
    timings = {}
    for isa in parts.timed_forms():  # not the slow literal form, nor a permute not native here
        timings[f"q4lab fused ({isa})"] = cycle_time(
            quantized,
            lambda layer, isa=isa: fused._kernel(xs[layer[1].shape[1]], layer[0], layer[1], None,
                                                 isa),
            passes=5 if isa != "portable" else 1)
    timings["q4lab fused (auto)"] = cycle_time(
        quantized, lambda layer: q4lab.matmul_4bit(xs[layer[1].shape[1]], layer[0], layer[1]),
        passes=5)
    form = fused.decode_form()
    rows_name = f"q4lab fused ({form}, decode layout: what Linear4bit decodes with)"
    if form is not None:
        decoded = [(xs[s.shape[1]], parts.decode_layout_args(p, s)) for p, s in quantized]
        assert_bytes_equal(q4lab.matmul_4bit(decoded[0][0], *quantized[0]),
                           torch.ops.q4lab.matmul_4bit(decoded[0][0], *decoded[0][1], None, form),
                           "decode layout")
        timings[rows_name] = cycle_time(
            decoded, lambda d: torch.ops.q4lab.matmul_4bit(d[0], *d[1], None, form), passes=5)
        del decoded
    few = quantized[: max(len(SHAPES), len(quantized) // 4)]
    timings["dequantize + F.linear (q4lab before)"] = cycle_time(
        few, lambda layer: F.linear(xs[layer[1].shape[1]],
                                    q4lab.dequantize_4bit(layer[0], layer[1], torch.float32)),
        passes=2)
    bnb_layers = [(p.view(-1, 1).t(), bnb_state(s), s.shape[1]) for p, s in few]
    timings["bitsandbytes matmul_4bit"] = cycle_time(
        bnb_layers, lambda layer: bnb.matmul_4bit(xs[layer[2]], layer[0], layer[1]), passes=2)
    del quantized, few, bnb_layers
    floats = make_layers(cycle_bytes, lambda s: s[0] * s[1] * 4, lambda s, i: weight(s, i))
    timings["float32 F.linear"] = cycle_time(floats, lambda w: F.linear(xs[w.shape[1]], w),
                                             passes=3)
    del floats

    base = timings.get(rows_name, timings["q4lab fused (auto)"])
    results["ms_per_layer"] = {k: v * 1e3 for k, v in timings.items()}
    results["packed_GBps_q4lab_fused"] = packed_per_layer / base / 1e9
    results["stored_GBps_q4lab_fused"] = stored / base / 1e9
    results["fraction_of_torch_sum_bandwidth"] = packed_per_layer / base / bandwidth
    results["speedup_vs"] = {k: v / base for k, v in timings.items()}
    return results


# ---- part 2: SmolLM2 decode ----------------------------------------------------------------------
def decode_tokens_per_s(model, tok, n: int) -> float:
    enc = tok("The history of the printing press", return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, **kw)
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)
            seconds = time.perf_counter() - start
            best = max(best, (out.shape[1] - enc["input_ids"].shape[1]) / seconds)
    return best


def decode_breakdown(model, tok, n: int) -> dict:
    """Milliseconds per token spent in the linear layers (lm_head apart) and in everything else
    (attention, norms, rotary, the KV cache, sampling, Python), from forward hooks that time every
    linear layer during one greedy decode of ``n`` tokens: Amdahl's law for decode. With zero-time
    linear layers a model could decode at most ``1000 / rest`` tokens/s."""
    from q4lab.nn import Linear4bit

    spent, starts, handles = {"linear layers": 0.0, "lm_head": 0.0}, {}, []

    def timed(key):
        def pre(module, args):
            starts[module] = time.perf_counter()

        def post(module, args, out):
            spent[key] += time.perf_counter() - starts.pop(module)
        return pre, post

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Linear4bit)):
            pre, post = timed("lm_head" if name == "lm_head" else "linear layers")
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    enc = tok("The history of the printing press", return_tensors="pt")
    try:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    made = out.shape[1] - enc["input_ids"].shape[1]
    ms = {k: 1e3 * v / made for k, v in spent.items()}
    ms["everything else"] = 1e3 * total / made - sum(ms.values())
    return ms


def bnb_model(model):
    import bitsandbytes as bnb

    cfg = q4lab.Q4Config()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not cfg.skips(name) \
                and module.weight.numel() >= cfg.min_numel:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features,
                                      bias=module.bias is not None, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=64,
                                             compress_statistics=True,
                                             quant_type="nf4")._quantize("cpu")
            if module.bias is not None:
                layer.bias = module.bias
            q4lab.quantize.set_submodule(model, name, layer)
    return model.eval()


def compiled_tokens_per_s(model, tok, n: int, warm_only: bool = False) -> float:
    """Greedy decode tokens/s of ``torch.compile(model.forward)`` with a static KV cache (so the
    shapes stay fixed); compiled and warmed up at the same length first (``warm_only``), so no
    compilation is timed."""
    enc = tok("The history of the printing press", return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, cache_implementation="static",
              max_new_tokens=n, min_new_tokens=n)
    best = 0.0
    with torch.no_grad():
        if warm_only:
            model.forward = torch.compile(model.forward, dynamic=False)
            for _ in range(2):                  # compiles (prefill and decode graphs)
                model.generate(**enc, **kw)
            return 0.0
        for _ in range(2):
            start = time.perf_counter()
            out = model.generate(**enc, **kw)
            seconds = time.perf_counter() - start
            best = max(best, (out.shape[1] - enc["input_ids"].shape[1]) / seconds)
    return best


def bench_decode_compiled(tokens: int, rounds: int) -> dict:
    """float32 vs q4lab's fused 4-bit model, each under torch.compile (static KV cache): how far
    decode gets once most of the per-token Python and small-op overhead is compiled away."""
    from q4lab import models

    fp, tok = models.load_smollm2()
    q, _ = models.load_smollm2()
    q4lab.quantize_model(q.eval(), q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
    # Compiled code skips the sibling groups' bookkeeping: each layer gets its own decode layout,
    # built by eager decode calls before compiling (q4lab/decode_groups.py).
    decode_groups.unlink_siblings(q)
    with torch.no_grad():   # eager decode calls first: the decode layouts are built (and kept)
        for _ in range(2):
            q.generate(**tok("warm", return_tensors="pt"), max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    both = {"float32": fp.eval(), "q4lab NF4+DQ (fused)": q}
    for m in both.values():
        compiled_tokens_per_s(m, tok, tokens, warm_only=True)
    runs = parts.interleaved(both, lambda m: compiled_tokens_per_s(m, tok, tokens), rounds)
    return {"tokens_per_s": runs["best"], "rounds": runs["rounds"], "tokens": tokens,
            "q4lab_vs_float32": parts.round_ratio(runs, "q4lab NF4+DQ (fused)", "float32")}


def bench_decode(tokens: int, rounds: int) -> dict:
    from q4lab import models
    from q4lab.nn import Linear4bit

    fp, tok = models.load_smollm2()
    fp.eval()
    split = {"float32": decode_breakdown(fp, tok, tokens)}
    q, _ = models.load_smollm2()
    q4lab.quantize_model(q.eval(), q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
    rates = parts.linear_rates(q, tok, tokens)
    b, _ = models.load_smollm2()
    b = bnb_model(b)

    class Dequantizing:  # the same 4-bit model on its dequantize + F.linear path
        pass

    deq = Dequantizing()

    def measure(m):
        if m is deq:
            Linear4bit.matmul_path = "dequantize"
            try:
                return decode_tokens_per_s(q, tok, tokens)
            finally:
                Linear4bit.matmul_path = "auto"
        return decode_tokens_per_s(m, tok, tokens)

    fused_name = "q4lab NF4+DQ (fused)"
    runs = parts.interleaved({"float32": fp, fused_name: q,
                        "q4lab NF4+DQ (dequantize + F.linear)": deq,
                        "bitsandbytes NF4+DQ": b}, measure, rounds)
    split[fused_name] = decode_breakdown(q, tok, tokens)
    split["bitsandbytes NF4+DQ"] = decode_breakdown(b, tok, tokens)
    answers = {}
    for path in ("dequantize", "auto"):
        Linear4bit.matmul_path = path
        answers[path] = [models.generate(q, tok, p, 32) for p in PROMPTS]
    Linear4bit.matmul_path = "auto"
    same = [a == b for a, b in zip(answers["dequantize"], answers["auto"])]
    return {"tokens_per_s": runs["best"], "rounds": runs["rounds"],
            "q4lab_vs_float32": parts.round_ratio(runs, fused_name, "float32"),
            "q4lab_vs_bitsandbytes": parts.round_ratio(runs, fused_name, "bitsandbytes NF4+DQ"),
            "ms_per_token_split": split, "tokens": tokens, "linear_rates": rates,
            "greedy_continuations_identical": same,
            "continuations": {"fused": answers["auto"], "dequantize": answers["dequantize"]}}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycle-mib", type=float, default=None,
                        help="MiB of packed 4-bit layers per cycle (default: 2 x last-level cache, "
                             "at least 256)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per decode timing")
    parser.add_argument("--skip-model", action="store_true", help="layers only, no SmolLM2 decode")
    parser.add_argument("--compile", action="store_true",
                        help="also decode float32 and q4lab fused under torch.compile (minutes)")
    parser.add_argument("--skip-1b", action="store_true", help="no synthetic 1.1B Llama decode")
    parser.add_argument("--tokens-1b", type=int, default=16, help="new tokens of the 1.1B decode")
    parser.add_argument("--skip-layers", action="store_true",
                        help="no mixed-shape layer cycle (the 12-layer GEMV still runs)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per decode comparison (ratios: median of rounds)")
    parser.add_argument("--write-crossover", action="store_true",
                        help="regenerate q4lab/_crossover.py from this run's crossover")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    assert q4lab.backends()["cpu"] is True, q4lab.backends()
    info = machine(last_level_cache_mib=last_level_cache_bytes() / 2**20, isas=fused.isas())
    cycle = int((args.cycle_mib or max(256, 2 * info["last_level_cache_mib"])) * 2**20)
    bandwidth = read_bandwidth(max(cycle, 1 << 30))
    print(f"torch.sum reads {bandwidth / 1e9:.1f} GB/s", flush=True)
    result = {"machine": info, "torch_sum_GBps": bandwidth / 1e9, "gemv": parts.gemv(bandwidth)}
    report_gemv(result)
    result["crossover"] = parts.crossover(write=args.write_crossover)
    print(f"crossover rows per form: {result['crossover']['crossover_rows']}", flush=True)
    if not args.skip_layers:
        result["layers"] = bench_layers(cycle, bandwidth)
    if not args.skip_model:
        result["decode"] = bench_decode(args.tokens, args.rounds)
        if args.compile:
            result["decode_compiled"] = bench_decode_compiled(args.tokens, args.rounds)
    if not args.skip_1b:
        result["llama_1b"] = parts.bench_llama_1b(args.tokens_1b, bandwidth, args.rounds)
    info["load_average_at_end"] = os.getloadavg()
    path = write_results(result, f"infer_cpu_{today()}.json")  # before the report: kept if it fails
    report(result)
    print(f"wrote {path}")
    return result


def target(value: float, goal: float) -> str:
    """The issue's target beside a measured ratio."""
    return f"[target >= {goal:g}: {'met' if value >= goal else 'NOT met'}]"


def report_gemv(r: dict) -> None:
    g = r["gemv"]
    print(f"\none-row GEMV, {g['layers']} distinct {g['shape'][0]}x{g['shape'][1]} NF4+DQ layers, "
          f"{torch.get_num_threads()} threads, torch.sum {r['torch_sum_GBps']:.1f} GB/s, "
          f"load {os.getloadavg()[0]:.1f}")
    for name, ms in g["ms_per_layer"].items():
        print(f"  {name:30s} {ms:7.3f} ms/layer = {100 * g['fraction_of_torch_sum'][name]:5.1f}% "
              f"of torch.sum's bandwidth")
    avx512 = "avx512f" in _build.cpu_flags()
    best_form = max(g["fraction_of_torch_sum"].values())
    print(f"  best form: {100 * best_form:.1f}% of torch.sum "
          f"{target(best_form, 0.6 if avx512 else 0.4)} ({'AVX-512' if avx512 else 'AVX2-only'})")
    c = g["in_cache_ceiling"]
    print(f"  inner-loop ceiling ({c['form']}, {c['shape']} in L2): {c['packed_GBps']:.2f} GB/s = "
          f"{100 * c['fraction_of_torch_sum']:.0f}% of torch.sum", flush=True)


def report(r: dict) -> None:
    report_gemv(r)
    print(f"\ncrossover rows (fused faster than dequantize + F.linear up to): "
          f"{r['crossover']['crossover_rows']}")
    if "llama_1b" in r:
        b = r["llama_1b"]
        print("\nsynthetic 1.1B Llama greedy decode (best of rounds): " + ", ".join(
            f"{k} {v:.2f} tok/s" for k, v in b["tokens_per_s"].items()))
        print(f"  q4lab / float32 = {b['q4lab_vs_float32']:.2f}x {target(b['q4lab_vs_float32'], 3)}"
              f", q4lab / bf16 = {b['q4lab_vs_bfloat16']:.2f}x "
              f"{target(b['q4lab_vs_bfloat16'], 2)} (median of per-round ratios); 4-bit "
              f"linears' profiled kernel time = "
              f"{100 * b['linears_fraction_of_torch_sum']:.0f}% of torch.sum "
              f"{target(b['linears_fraction_of_torch_sum'], 0.6)}")
    if "decode" in r:
        lr = r["decode"]["linear_rates"]
        print(f"\nSmolLM2 4-bit linears in the model: {lr['linear4bit_ms_per_token_hooked']:.2f} "
              f"ms/token (hooks), kernel {lr['matmul_kernel_ms_per_token_profiled']:.2f} "
              f"(profiler), "
              f"standalone {lr['standalone_kernel_ms_per_token']:.2f}: in-model rate = "
              f"{100 * lr['in_model_rate_of_standalone']:.0f}% of standalone "
              f"{target(lr['in_model_rate_of_standalone'], 0.8)}")
    if "layers" not in r:
        return
    lay = r["layers"]
    print(f"\none-row matmul (stored bytes unless named), cycle of {lay['layers_in_cycle']} layers "
          f"({lay['packed_mib_in_cycle']:.0f} MiB packed), "
          f"torch.sum {r['torch_sum_GBps']:.1f} GB/s")
    for name, ms in lay["ms_per_layer"].items():
        print(f"  {name:40s} {ms:8.2f} ms/layer   "
              f"q4lab fused is {lay['speedup_vs'][name]:6.2f}x faster")
    print(f"  q4lab fused reads {lay['packed_GBps_q4lab_fused']:.1f} GB/s of packed bytes = "
          f"{100 * lay['fraction_of_torch_sum_bandwidth']:.0f}% of torch.sum's bandwidth")
    if "decode" in r:
        tps = r["decode"]["tokens_per_s"]
        q = tps["q4lab NF4+DQ (fused)"]
        print("\nSmolLM2-135M greedy decode, batch 1, KV cache (best of rounds)")
        d = r["decode"]
        print(f"  median of per-round ratios: q4lab fused / float32 = {d['q4lab_vs_float32']:.2f}x "
              f"{target(d['q4lab_vs_float32'], 1.5)}, / bitsandbytes = "
              f"{d['q4lab_vs_bitsandbytes']:.2f}x {target(d['q4lab_vs_bitsandbytes'], 1.3)}")
        split = r["decode"]["ms_per_token_split"]
        for name, v in tps.items():
            parts = ", ".join(f"{k} {ms:.1f}" for k, ms in split.get(name, {}).items())
            print(f"  {name:40s} {v:6.1f} tokens/s   q4lab fused / this = {q / v:5.2f}x   "
                  f"ms/token: {parts}")
        rest = split["q4lab NF4+DQ (fused)"]
        print(f"  with zero-time linear layers the fused model would still need "
              f"{rest['everything else'] + rest['lm_head']:.1f} ms/token "
              f"(lm_head + everything else): "
              f"at most {1e3 / (rest['everything else'] + rest['lm_head']):.0f} tokens/s")
        identical = r['decode']['greedy_continuations_identical']
        print(f"  greedy continuations fused == dequantize: {identical}")
    if "decode_compiled" in r:
        tps = r["decode_compiled"]["tokens_per_s"]
        q = tps["q4lab NF4+DQ (fused)"]
        print("\nthe same under torch.compile (static KV cache): q4lab / float32 = "
              f"{r['decode_compiled']['q4lab_vs_float32']:.2f}x (median of rounds) "
              f"{target(r['decode_compiled']['q4lab_vs_float32'], 1.5)}")
        for name, v in tps.items():
            print(f"  {name:40s} {v:6.1f} tokens/s   q4lab fused / this = {q / v:5.2f}x")


if __name__ == "__main__":
    main()
