"""Time whole-model 4-bit quantization of SmolLM2-135M-Instruct: q4lab vs bitsandbytes vs torchao.

Issue 4: ``q4lab.quantize_model(model)`` in one call, NF4 + double quant at blocksize 64 (QLoRA's
defaults) on every nn.Linear except the tied lm_head (210 layers, 106 M weights), timed against
the same layers quantized by bitsandbytes 0.50.2 (``Params4bit._quantize``, the path of
``bnb.nn.Linear4bit.to(device)``) and torchao's ``to_nf4`` (block 64, scaler block 256), in one
process on the same weights. Validated first (llm.c's rule): q4lab's packed bytes must equal bnb's
on every layer and the quantized model must still answer "Paris". Note: SmolLM2's weights were
already 4-bit (GGUF Q4_1) before this re-quantization.
Writes bench/results/model_<device>_<date>.json.

    python bench/bench_model.py [--backends cpu,reference] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import q4lab
from q4lab import models
from q4lab.testing import byte_mismatch

from _harness import Stopwatch, today, write_results
from _machine import machine


def eligible(model) -> list[str]:
    cfg = q4lab.Q4Config()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not cfg.skips(n) and m.weight.numel() >= cfg.min_numel]


def fresh(device):
    model, tok = models.load_smollm2(torch.float32, device)
    return model, tok


def time_q4lab(device, backend):
    model, tok = fresh(device)
    with Stopwatch(device) as clock:
        q4lab.quantize_model(model, q4lab.Q4Config(backend=backend), progress=False)
    return clock.wall_s, model, tok


def time_bnb(device):
    import bitsandbytes as bnb

    model, _ = fresh(device)
    names = eligible(model)
    weights = {n: model.get_submodule(n).weight.data for n in names}
    packed = {}
    with Stopwatch(device) as clock:
        for n in names:
            p = bnb.nn.Params4bit(weights[n], requires_grad=False, blocksize=64,
                                  compress_statistics=True, quant_type="nf4")._quantize(device)
            packed[n] = p.data
    return clock.wall_s, packed


def time_torchao(device):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    model, _ = fresh(device)
    weights = [model.get_submodule(n).weight.data for n in eligible(model)]
    ok = [w for w in weights if (w.numel() // 64) % 256 == 0]  # to_nf4 needs whole scaler blocks
    with Stopwatch(device) as clock:
        for w in ok:
            to_nf4(w, 64, 256)
    return clock.wall_s, len(ok), sum(w.numel() for w in ok)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="auto,reference",
                        help="q4lab backends to time, comma-separated (auto, cpu, cuda, reference)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    models.load_smollm2()  # parse/convert once, outside the timings

    results = {}
    first = None
    for backend in args.backends.split(","):
        seconds, model, tok = time_q4lab(device, backend)
        results[f"q4lab_{backend}"] = seconds
        print(f"q4lab quantize_model ({backend}): {seconds:.2f} s", flush=True)
        first = first or (model, tok)
    model, tok = first
    t_bnb, bnb_packed = time_bnb(device)
    print(f"bitsandbytes Params4bit._quantize: {t_bnb:.2f} s", flush=True)
    bad = {n: msg for n, p in bnb_packed.items()
           if (msg := byte_mismatch(p.reshape(-1), model.get_submodule(n).packed))}
    print(f"validation: {len(bnb_packed) - len(bad)}/{len(bnb_packed)} layers byte-identical "
          f"to bnb NF4" + (f"; first difference {next(iter(bad.items()))}" if bad else ""))
    answer = models.generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    print(f"answer after quantization: {answer!r}")
    if bad or "Paris" not in answer:
        raise SystemExit("validation failed; not reporting timings")
    results["bitsandbytes"] = t_bnb
    torchao_scope = None
    try:
        seconds, layers, params = time_torchao(device)
        results["torchao_to_nf4"] = seconds
        torchao_scope = {"layers": layers, "params": params}
        print(f"torchao to_nf4: {seconds:.2f} s on the {layers} layers ({params:,} weights) it "
              f"accepts (it needs numel/64 to be a multiple of 256)")
    except Exception as exc:  # torchao is optional for this comparison
        print(f"torchao skipped: {type(exc).__name__}: {exc}")
    rep = q4lab.report(model)
    for name in [k for k in list(results) if k.startswith("q4lab_")]:
        print(f"{name}: {results['bitsandbytes'] / results[name]:.2f}x bitsandbytes' speed")
    out = {"device": device, "machine": machine(), "layers": len(bnb_packed),
           "params": rep.total["params"], "seconds": results, "torchao_scope": torchao_scope,
           "timing": "one run each, after a warm-up load", "answer": answer,
           "bytes_before": rep.total["bytes_before"], "bytes_after": rep.total["bytes_after"],
           "note": rep.note}
    path = write_results(out, f"model_{device}_{today()}.json")
    print(rep.summary(), f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
