"""Peak memory and speed of streaming quantization: ``q4lab.quantize_checkpoint`` vs loading the
model with transformers and calling ``q4lab.quantize_model``, on a sharded bf16 checkpoint with
Llama-2-7B layer shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000, untied output layer) that
this script writes itself: 3 decoder layers, 1.74 GB in 4 shards (``--layers`` changes the size).

Each measurement runs in its own child interpreter and reports its peak resident set (``VmHWM`` in
``/proc/self/status``, which counts memory-mapped file pages too). The reference point is a child
that has only imported torch and q4lab. Validated before anything is reported (llm.c's rule): the
streamed directory must equal, file for file and byte for byte, ``quantize_model`` +
``q4lab.save_pretrained`` on the loaded model, and it must load in transformers + bitsandbytes
0.50.2 with logits identical to ``q4lab.from_pretrained`` of the same directory (bnb's AVX512-BF16
repacking turned off, as in tests/test_hf.py). Then the arithmetic for Llama-2-7B and -70B: bytes
read and written, RAM needed, minutes at the measured rate.

Streaming keeps one weight tensor and its 4-bit result in memory (q4lab/formats/stream.py); what it
adds besides is the import of transformers' model code (to build the model on the meta device and
decide which tensors are Linear weights), measured separately as ``imports_rss``.
Writes bench/results/stream_cpu_<date>.json. The machine is shared: the load average before and
after each child is recorded beside the timings.

    python bench/bench_stream.py [--layers 3] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import Stopwatch, today, write_results
from _machine import machine

LLAMA = {"7B": dict(hidden=4096, mlp=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
         "70B": dict(hidden=8192, mlp=28672, layers=80, heads=64, kv_heads=8, vocab=32000)}


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---- children ---------------------------------------------------------------------------------
def child(kind: str, src: str, dst: str) -> dict:
    import torch

    import q4lab

    start_mb = hwm_mb()
    clock = Stopwatch()
    if kind == "baseline":
        pass
    elif kind == "warm":  # build / load the C++ kernels once, so no timed child pays for it
        q4lab.quantize_4bit(torch.ones(64, 64))
    elif kind == "imports":  # what streaming imports besides torch + q4lab: transformers' model
        from transformers import AutoConfig

        from q4lab.formats.hf import empty_model

        empty_model(AutoConfig.from_pretrained(src))
    elif kind == "stream":
        q4lab.quantize_checkpoint(src, dst, progress=False)
    elif kind == "load":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        loaded_mb = hwm_mb()
        q4lab.quantize_model(model, progress=False)
        q4lab.save_pretrained(model, dst)
        return {"start_mb": start_mb, "peak_mb": hwm_mb(), "after_load_mb": loaded_mb,
                "seconds": clock.stop()}
    elif kind == "verify":
        return verify(src)
    return {"start_mb": start_mb, "peak_mb": hwm_mb(), "seconds": clock.stop()}


def verify(directory: str) -> dict:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    import q4lab

    theirs = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    layers = [m for m in theirs.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    ours = q4lab.from_pretrained(directory)
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    return {"bnb_layers": len(layers), "logits_identical": bool(torch.equal(a, b)),
            "logits_finite": bool(torch.isfinite(a).all())}


def run_child(kind: str, src, dst="") -> dict:
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(dst)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return out


# ---- the checkpoint ------------------------------------------------------------------------------
def write_checkpoint(directory: Path, layers: int, shard_bytes: int = 500_000_000) -> dict:
    """A bf16 Llama checkpoint with 7B shapes and random N(0, 0.02) weights, written shard by
    shard with safetensors' save_file (as transformers shards: one index, ~500 MB per shard)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    s = LLAMA["7B"]
    LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=layers,
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                vocab_size=s["vocab"], tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(directory)
    h, m, v = s["hidden"], s["mlp"], s["vocab"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                   (p + "mlp.down_proj.weight", (h, m))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    gen = torch.Generator().manual_seed(0)
    count, current, size = 0, {}, 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if current and size + n > shard_bytes:
            count += 1
            save_file(current, str(directory / f"shard-{count}.safetensors"),
                      metadata={"format": "pt"})
            current, size = {}, 0
        current[name] = torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else \
            (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += n
    count += 1
    save_file(current, str(directory / f"shard-{count}.safetensors"), metadata={"format": "pt"})
    del current
    weight_map, total = {}, 0
    for i in range(1, count + 1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(directory / f"shard-{i}.safetensors", directory / final)
        with safe_open(str(directory / final), "pt") as f:
            weight_map.update({k: final for k in f.keys()})
        total += (directory / final).stat().st_size
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    params = sum(math.prod(s) for _, s in shapes)
    return {"bytes": total, "params": params, "shards": count,
            "largest_tensor_bytes": max(math.prod(s) for _, s in shapes) * 2,
            "largest_linear_bytes": h * m * 2}


def digests(directory: Path) -> dict:
    out = {}
    for p in sorted(directory.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


# ---- 7B / 70B arithmetic -------------------------------------------------------------------------
def model_bytes(s: dict) -> dict:
    """Source (bf16) and 4-bit output bytes of a Llama with shapes ``s``: NF4 + double quant at
    blocksize 64 on every decoder Linear (packed n/2, uint8 absmax per 64, float32 per 256 blocks,
    bnb's 64 B quant_map + 1 KiB nested_quant_map + ~170 B JSON per layer); embeddings, norms and
    lm_head stay bf16."""
    h, m, v, L = s["hidden"], s["mlp"], s["vocab"], s["layers"]
    kv = h * s["kv_heads"] // s["heads"]
    linears = [h * h, h * kv, h * kv, h * h, m * h, m * h, h * m]
    def q4(n):
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 64 + 1024 + 170
    lin = L * sum(linears)
    other = 2 * v * h + (2 * L + 1) * h
    return {"params": lin + other, "source_bytes": 2 * (lin + other),
            "output_bytes": L * sum(q4(n) for n in linears) + 2 * other,
            "largest_linear_bytes": 2 * max(linears)}


def arithmetic(stream: dict, imports: dict, baseline: dict, ckpt: dict, seconds: float) -> dict:
    """RAM = baseline + transformers' model code (measured) + per-tensor working set scaled from
    the measured one by the largest Linear weight; minutes at the measured GB/s."""
    per_tensor = stream["peak_mb"] - imports["peak_mb"]
    rate = ckpt["bytes"] / 1e9 / seconds
    out = {"measured_rate_GB_per_s": rate}
    for name, s in LLAMA.items():
        b = model_bytes(s)
        scale = b["largest_linear_bytes"] / ckpt["largest_linear_bytes"]
        out[name] = {
            "source_GB": b["source_bytes"] / 1e9, "output_GB": b["output_bytes"] / 1e9,
            "disk_written_GB": 2 * b["output_bytes"] / 1e9,
            "disk_note": "each shard is staged in a temporary data file, then written: 2x the "
                         "output; peak extra disk = output + one 5 GB shard",
            "ram_streaming_MB": baseline["peak_mb"] + (imports["peak_mb"] - baseline["peak_mb"])
            + per_tensor * scale,
            "ram_load_then_quantize_MB": baseline["peak_mb"] + b["source_bytes"] / 2**20,
            "minutes_at_measured_rate": b["source_bytes"] / 1e9 / rate / 60,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--workdir", default=None,
                    help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="q4lab-bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    src, streamed, loaded = work / "source", work / "streamed", work / "loaded"
    try:
        for d in (src, streamed, loaded):
            shutil.rmtree(d, ignore_errors=True)
        src.mkdir()
        clock = Stopwatch()
        ckpt = write_checkpoint(src, args.layers)
        print(f"wrote {ckpt['bytes'] / 1e9:.2f} GB in {ckpt['shards']} shards "
              f"({clock.stop():.0f} s)", flush=True)
        if ckpt["bytes"] < 1.5e9:
            print("note: checkpoint below 1.5 GB (use --layers 3 or more for the issue's test)")
        run_child("warm", src)
        baseline = run_child("baseline", src)
        imports = run_child("imports", src)
        stream = run_child("stream", src, streamed)
        print(f"streaming: peak {stream['peak_mb']:.0f} MB in {stream['seconds']:.1f} s",
              flush=True)
        load = run_child("load", src, loaded)
        print(f"load + quantize_model: peak {load['peak_mb']:.0f} MB in {load['seconds']:.1f} s",
              flush=True)
        same = digests(streamed) == digests(loaded)
        check = run_child("verify", streamed)
        if not (same and check["logits_identical"] and check["logits_finite"]):
            raise SystemExit(f"validation failed: identical files {same}, {check}")
        size_mb = ckpt["bytes"] / 2**20
        result = {
            "machine": machine(note="load_average is at the end; each child records its "
                                    "load_average_before_after"),
            "checkpoint": {**ckpt, "layers": args.layers, "dtype": "bfloat16",
                           "shapes": "Llama-2-7B (hidden 4096, MLP 11008, vocab 32000, untied)"},
            "validation": {"streamed_equals_load_quantize_save": same, **check},
            "baseline_torch_q4lab": baseline, "imports_rss": imports,
            "streaming": {**stream, "increase_mb": stream["peak_mb"] - baseline["peak_mb"],
                          "increase_fraction_of_checkpoint":
                              (stream["peak_mb"] - baseline["peak_mb"]) / size_mb,
                          "seconds_per_GB": stream["seconds"] / (ckpt["bytes"] / 1e9)},
            "load_then_quantize_model": {
                **load, "increase_mb": load["peak_mb"] - baseline["peak_mb"],
                "increase_fraction_of_checkpoint": (load["peak_mb"] - baseline["peak_mb"])
                / size_mb, "seconds_per_GB": load["seconds"] / (ckpt["bytes"] / 1e9)},
            "output_bytes": sum(p.stat().st_size for p in streamed.iterdir()),
            "arithmetic": arithmetic(stream, imports, baseline, ckpt, stream["seconds"]),
        }
        out = write_results(result, f"stream_cpu_{today()}.json")
        s, ld = result["streaming"], result["load_then_quantize_model"]
        print(f"checkpoint {ckpt['bytes'] / 1e9:.2f} GB: streaming adds "
              f"{s['increase_mb']:.0f} MB ({100 * s['increase_fraction_of_checkpoint']:.1f} %), "
              f"load + quantize_model adds {ld['increase_mb']:.0f} MB "
              f"({100 * ld['increase_fraction_of_checkpoint']:.0f} %); streaming "
              f"{s['seconds_per_GB']:.1f} s/GB; wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4
                               else "")))
    else:
        main()
