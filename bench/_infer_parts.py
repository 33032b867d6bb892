"""Parts of bench/bench_infer.py: the 12-layer 4096x4096 GEMV yardstick of issue 21 (every CPU
form, the stored bytes and the decode layout, float32 and bf16 rows, beside torch.sum and the inner
loop's in-cache ceiling), the fused-vs-dequantize crossover per form (written to
q4lab/_crossover.py), the standalone-vs-in-model rate of the 4-bit linears (profiled per token),
and the synthetic ~1.1B Llama (hidden 2048, intermediate 5632, 16 layers, 32 heads, 4 KV heads,
vocab 32000) built with random weights from transformers' ``LlamaConfig``.
"""
from __future__ import annotations

import math
import time

import numpy as np
from pathlib import Path

import torch
import torch.nn.functional as F

import q4lab
from q4lab import matmul as fused
from q4lab.testing import assert_bytes_equal

CROSSOVER_FILE = Path(__file__).resolve().parent.parent / "q4lab" / "_crossover.py"
GEMV_LAYERS, GEMV_SHAPE = 12, (4096, 4096)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best(fn, passes: int) -> float:
    fn()
    return min(seconds(fn) for _ in range(passes))


def gemv(bandwidth: float, passes: int = 5) -> dict:
    """ms per 4096x4096 layer over a cycle of 12 distinct NF4+DQ layers (>= 4x an 8-32 MiB L3)."""
    n, k = GEMV_SHAPE
    layers = []
    for i in range(GEMV_LAYERS):
        g = torch.Generator().manual_seed(i)
        packed, state = q4lab.quantize_4bit(torch.randn(n, k, generator=g), 64, "nf4", True)
        layers.append({"stored": fused.kernel_args(packed, state),
                       "decode layout": decode_layout_args(packed, state),
                       "packed": packed, "state": state})
    packed_bytes = n * k // 2
    out = {"layers": GEMV_LAYERS, "shape": [n, k], "ms_per_layer": {}, "fraction_of_torch_sum": {}}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k).to(dtype)
        first = layers[0]
        expected = fused.matmul_4bit(x, first["packed"], first["state"], backend="reference")
        for isa in timed_forms():
            # given the stored bytes, 'rows'/'permute' run the table form: time the decode layout
            for layout in ("decode layout",) if isa in fused.DECODE_LAYOUT_FORMS else ("stored",):
                got = torch.ops.q4lab.matmul_4bit(x, *first[layout], None, isa)
                assert_bytes_equal(expected, got, f"gemv {isa} {layout} {dtype}")
                t = best(lambda x=x, layout=layout, isa=isa: [
                    torch.ops.q4lab.matmul_4bit(x, *lay[layout], None, isa) for lay in layers],
                    passes) / len(layers)
                name = f"{isa} {layout} {str(dtype).replace('torch.', '')}"
                out["ms_per_layer"][name] = t * 1e3
                out["fraction_of_torch_sum"][name] = packed_bytes / t / bandwidth
    # the inner loop's ceiling: one layer whose share per thread stays in that core's L2 (256 KiB
    # of codes each at 2 threads), called over and over
    packed, state = q4lab.quantize_4bit(torch.randn(1024, 1024), 64, "nf4", True)
    isa = fused.isas()[-1]
    args = decode_layout_args(packed, state) if isa in fused.DECODE_LAYOUT_FORMS \
        else fused.kernel_args(packed, state)
    x = torch.randn(1, 1024)
    t = best(lambda: [torch.ops.q4lab.matmul_4bit(x, *args, None, isa) for _ in range(200)],
             passes) / 200
    out["in_cache_ceiling"] = {"form": isa, "shape": [1024, 1024],
                               "packed_GBps": 1024 * 512 / t / 1e9,
                               "fraction_of_torch_sum": 1024 * 512 / t / bandwidth}
    return out


def timed_forms() -> list[str]:
    """The CPU forms worth timing here: all but 'portable' (the slow literal form) and a 'permute'
    that is not native (without AVX-512F it is the same source lowered lane by lane, for tests)."""
    forms = fused.isas()
    return [f for f in forms[1:] if f != "permute" or forms[-1] == "permute"]


def decode_layout_args(packed, state) -> tuple:
    """The op's weight arguments with the decode layout of the `rows`/`permute` forms (what
    Linear4bit caches from its second decode call on)."""
    return fused.repack_rows(packed, state) + (None, None) + fused.kernel_args(packed, state)[4:]


def crossover(passes: int = 3, write: bool = False) -> dict:
    """Fused (the decode layout for `rows`, the stored bytes for the other forms) vs dequantize +
    F.linear for 1-64 rows of x on a 4096x4096 layer, per CPU form; the crossover is the largest
    row count up to which fused always wins. ``write`` regenerates q4lab/_crossover.py, the
    committed table Linear4bit reads (never a timing at run
    time: a model's output bytes must not depend on one)."""
    packed, state = q4lab.quantize_4bit(torch.randn(4096, 4096), 64, "nf4", True)
    table, measured = {}, {}
    rows_list = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
    for isa in ["portable"] + timed_forms():
        args = decode_layout_args(packed, state) if isa in fused.DECODE_LAYOUT_FORMS else \
            fused.kernel_args(packed, state)
        measured[isa] = {}
        rows_ok = 0
        for rows in rows_list:
            x = torch.randn(rows, 4096)
            if isa == "portable" and rows > 4:
                break
            f_s = best(lambda x=x, args=args, isa=isa:
                       torch.ops.q4lab.matmul_4bit(x, *args, None, isa), passes)
            d_s = best(lambda x=x: F.linear(x, q4lab.dequantize_4bit(packed, state, torch.float32)),
                       passes)
            measured[isa][rows] = {"fused_ms": f_s * 1e3, "dequantize_linear_ms": d_s * 1e3}
            if f_s >= d_s:
                break
            rows_ok = rows
        table[isa] = max(1, rows_ok)
    if write:
        CROSSOVER_FILE.write_text(
            '"""GENERATED by ``python bench/bench_infer.py --write-crossover``\n'
            '(bench/_infer_parts.py ``crossover``); do not edit. Rows of x up to which the fused\n'
            'matmul beat dequantize + ``F.linear`` on a 4096x4096 NF4+DQ layer, per CPU form of\n'
            'the kernel, on the machine named below. ``Linear4bit`` reads this table\n'
            '(``q4lab.matmul.fused_max_rows``) instead of timing anything at run time, so a\n'
            'model\'s output bytes never depend on a timing.\n'
            '"""\n'
            f"MEASURED_ON = {_machine_line()!r}\n"
            f"CROSSOVER_ROWS = {table!r}\n")
    return {"crossover_rows": table, "measured": measured, "written": write}


def _machine_line() -> str:
    from _machine import cpu_model
    import os
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, " \
           f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"


def linear_rates(model, tok, tokens: int) -> dict:
    """Per decode token: the 4-bit linears' time inside the model against the same kernel calls made
    standalone. In the model: forward hooks around every Linear4bit call with one row of input (the
    decode steps of ``generate``; the prefill call is left out), Python included; and the
    profiler's self time of ``q4lab::matmul_4bit`` for one-row inputs. Standalone: the layers' own
    cached arguments and one-row inputs of their shapes, called back to back. In-model rate =
    standalone / hooked (docs/architecture.md, "Per-call overhead")."""
    from q4lab.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    spent, calls, starts, handles = [0.0], [0], {}, []

    def pre(mod, args):
        if args[0].numel() == mod.in_features:
            starts[mod] = time.perf_counter()

    def post(mod, args, out):
        if mod in starts:
            spent[0] += time.perf_counter() - starts.pop(mod)
            calls[0] += 1

    for m in layers:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    enc = tok("The history of the printing press", return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, max_new_tokens=tokens,
              min_new_tokens=tokens)
    try:
        with torch.no_grad():
            model.generate(**enc, **kw)          # warm: the decode layouts are built here
            spent[0], calls[0] = 0.0, 0
            model.generate(**enc, **kw)
    finally:
        for h in handles:
            h.remove()
    steps = calls[0] / len(layers)               # one-row forward passes (decode steps)
    hooked_ms = 1e3 * spent[0] / steps
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), torch.profiler.profile(activities=cpu, record_shapes=True) as prof:
        model.generate(**enc, **kw)
    kernel_ms = one_row_kernel_ms(prof, steps)
    xs = [torch.randn(1, 1, m.in_features).to(m.compute_dtype) for m in layers]
    argss = [m._kernel_args() for m in layers]

    def standalone():
        for x, a in zip(xs, argss):
            torch.ops.q4lab.matmul_4bit(x, *a, None, "auto")
    alone_ms = 1e3 * best(standalone, 5)
    nbytes = sum(sum(q4lab.storage_bytes(m.quant_state).values()) for m in layers)
    return {"decode_steps": steps, "linear4bit_ms_per_token_hooked": hooked_ms,
            "matmul_kernel_ms_per_token_profiled": kernel_ms,
            "standalone_kernel_ms_per_token": alone_ms, "stored_bytes_per_token": nbytes,
            "in_model_rate_of_standalone": alone_ms / hooked_ms,
            "standalone_packed_GBps": nbytes / alone_ms / 1e6}


def llama_1b(dtype=torch.float32):
    """A ~1.1B-parameter Llama with random weights (TinyLlama's shape), tokenizer of SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def decode_ids_tokens_per_s(model, tokens: int, prompt_len: int = 8) -> float:
    """Greedy decode tokens/s from a fixed random prompt (token ids; no tokenizer needed)."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len),
                        generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, **kw)
    return (out.shape[1] - prompt_len) / (time.perf_counter() - start)


def interleaved(models: dict, measure, rounds: int) -> dict:
    """tokens/s of every model, measured round by round in turn (this VM's speed drifts by tens of
    percent within minutes: interleaving lets the drift hit every model alike). Returns per model
    the best rate and every round's rate."""
    runs = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            runs[name].append(measure(model))
            print(f"  round {r + 1}/{rounds} {name}: {runs[name][-1]:.2f} tokens/s", flush=True)
    return {"best": {k: max(v) for k, v in runs.items()}, "rounds": runs}


def round_ratio(runs: dict, a: str, b: str) -> float:
    """Median over rounds of a's tokens/s over b's in the same round."""
    return float(np.median([x / y for x, y in zip(runs["rounds"][a], runs["rounds"][b])]))


def one_row_kernel_ms(prof, steps: float) -> float:
    """Self time of q4lab::matmul_4bit calls with one row of input (decode steps), per step."""
    return sum(e.self_cpu_time_total for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "q4lab::matmul_4bit" and e.input_shapes
               and math.prod(e.input_shapes[0][:-1]) == 1) / 1e3 / steps


def bench_llama_1b(tokens: int, bandwidth: float, rounds: int) -> dict:
    """float32, bf16 and q4lab NF4+DQ (fused, compute float32) greedy decode of the synthetic 1.1B
    model, interleaved; lm_head stays float as Q4Config's default keeps it."""
    from q4lab.nn import Linear4bit

    q = llama_1b(torch.float32)
    q4lab.quantize_model(q, q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
    models = {"float32": llama_1b(torch.float32), "bfloat16": llama_1b(torch.bfloat16),
              "q4lab NF4+DQ (fused)": q}
    runs = interleaved(models, lambda m: decode_ids_tokens_per_s(m, tokens), rounds)
    layers = [m for m in q.modules() if isinstance(m, Linear4bit)]
    nbytes = sum(sum(q4lab.storage_bytes(m.quant_state).values()) for m in layers)
    ids = torch.randint(0, 32000, (1, 8))
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        q.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                   pad_token_id=0)
    kernel_ms = one_row_kernel_ms(prof, tokens - 1)
    fused = "q4lab NF4+DQ (fused)"
    return {"tokens_per_s": runs["best"], "rounds": runs["rounds"], "tokens": tokens,
            "linear4bit_stored_bytes": nbytes, "matmul_kernel_ms_per_token": kernel_ms,
            "linears_fraction_of_torch_sum": nbytes / (kernel_ms / 1e3) / bandwidth,
            "q4lab_vs_float32": round_ratio(runs, fused, "float32"),
            "q4lab_vs_bfloat16": round_ratio(runs, fused, "bfloat16")}
