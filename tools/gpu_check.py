"""One command for a GPU machine: the CUDA kernels against the NumPy reference, byte for byte.

``python tools/gpu_check.py [--out DIR]`` builds the kernels (CPU + CUDA, JIT), then for every
format of ``q4lab.quant_types`` that has a quantizer and a set of shapes (tails, odd sizes, rows
that straddle blocks) quantizes a random tensor on the GPU and with ``backend="reference"``,
and compares packed bytes, every statistic and the dequantized values; the fused matmul
(``q4lab.matmul_4bit``) on CUDA is compared with ``backend="reference"`` too. Prints
"k/n bytes differ, first at i" per case and writes DIR/gpu_check.json (device, versions, date).
Run the pytest CUDA suite beside it: ``python -m pytest -q tests/test_kernels_cuda.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import q4lab  # noqa: E402


def differing(a, b) -> str:
    a = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
    b = np.frombuffer(np.ascontiguousarray(b).tobytes(), np.uint8)
    if a.size != b.size:
        return f"sizes differ ({a.size} vs {b.size} bytes)"
    bad = np.flatnonzero(a != b)
    return f"{bad.size}/{a.size} bytes differ" + (f", first at {bad[0]}" if bad.size else "")


def host(t):
    if t is None or not torch.is_tensor(t):
        return None if t is None else np.asarray(t)
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def state_parts(state) -> dict:
    parts = {"absmax": state.absmax, "offset": state.offset, "tensor_scale": state.tensor_scale}
    if state.state2 is not None:
        parts["nested_absmax"] = state.state2.absmax
    return {k: host(v) for k, v in parts.items() if v is not None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = ap.parse_args()
    dev = args.device
    print("backends:", q4lab.backends(), flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, failures = [], 0
    shapes = [(64, 256), (33, 96), (7, 32), (128, 4096)]
    for name in ["nf4", "fp4", "mxfp4", "nvfp4", "q4_0", "q4_1"]:
        for shape in shapes:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
                try:
                    pr, sr = q4lab.quantize_4bit(w, quant_type=name, backend="reference")
                except ValueError as exc:  # a shape the format refuses: it must refuse on GPU too
                    try:
                        q4lab.quantize_4bit(w.to(dev), quant_type=name, backend=dev)
                        verdict = f"reference refused ({exc}) but CUDA accepted"
                    except ValueError:
                        verdict = "refused by both"
                    ok = verdict == "refused by both"
                else:
                    pc, sc = q4lab.quantize_4bit(w.to(dev), quant_type=name, backend=dev)
                    checks = {"packed": differing(host(pr), host(pc))}
                    ref_parts, cuda_parts = state_parts(sr), state_parts(sc)
                    for key in ref_parts:
                        checks[key] = differing(ref_parts[key], cuda_parts.get(key))
                    dr = q4lab.dequantize_4bit(pr, sr, backend="reference")
                    dc = q4lab.dequantize_4bit(pc, sc, backend=dev)
                    checks["dequantized"] = differing(host(dr), host(dc))
                    if name in ("nf4", "fp4") and len(shape) == 2:
                        x = torch.randn(3, shape[1], generator=gen)
                        yr = q4lab.matmul_4bit(x, pr, sr, backend="reference")
                        yc = q4lab.matmul_4bit(x.to(dev), pc, sc, backend=dev)
                        checks["matmul"] = differing(host(yr), host(yc))
                    ok = all(" 0/" in v or v.startswith("0/") for v in checks.values())
                    verdict = "; ".join(f"{k}: {v}" for k, v in checks.items())
                failures += not ok
                rows.append({"quant_type": name, "shape": list(shape), "dtype": str(dtype),
                             "ok": ok, "result": verdict})
                print(f"{'ok  ' if ok else 'FAIL'} {name:6s} {str(shape):12s} {str(dtype):15s} "
                      f"{verdict}", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torch": torch.__version__,
              "cuda": torch.version.cuda, "cases": len(rows), "failures": failures, "rows": rows}
    out = Path(args.out) / "gpu_check.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    if "cpu" not in sys.argv and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU (--device cpu runs the same checks on the CPU)")
    sys.exit(main())
