"""The outside anchors of q4lab's other 4-bit formats and the adversarial cases they are checked
on, shared by ``bench/sweep_formats.py`` (>= 10^4 cases per format) and
``tests/test_formats_parity.py`` (a small slice). q4lab's own code never imports torchao or gguf;
this file is where they are called.

Anchors (docs/formats.md):
- MXFP4: torchao ``mx_formats.mx_tensor.to_mx(x, torch.float4_e2m1fn_x2, 32)`` (E8M0 scales,
  packed codes) and ``to_dtype(..., torch.float32)`` (dequantized values);
- NVFP4: torchao ``nvfp4_tensor.nvfp4_quantize(x, 16, per_tensor_scale)`` with and without a
  per-tensor scale (``per_tensor_amax_to_scale``), and ``NVFP4Tensor.dequantize``;
- Q4_0 / Q4_1: ``gguf.quants.quantize`` (block bytes) and ``gguf.quants.dequantize``;
- Q4_K / IQ4_NL: ``gguf.quants.dequantize`` of random block bytes.

Each case has a named category (``CATEGORIES``); a case passes when every compared array is
equal byte for byte, or when q4lab refuses it with a ValueError where the anchor refuses too or
produces a non-finite scale (NaN/Inf input, rows not a multiple of the block, fp16 overflow).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

F32 = np.float32
QUANTIZED = ("mxfp4", "nvfp4", "q4_0", "q4_1")
DEQUANT_ONLY = ("q4_k", "iq4_nl")
CATEGORIES = ("random", "ties", "max_6x2e", "subnormal", "zero_blocks", "ragged_rows",
              "nonfinite", "bf16_input", "huge")
#: Q4_K / IQ4_NL are dequantized from random block bytes: the categories choose the fp16 scales.
DEQUANT_CATEGORIES = ("random", "subnormal", "zero_blocks", "nonfinite", "huge")


def categories(quant_type: str) -> tuple:
    return DEQUANT_CATEGORIES if quant_type in DEQUANT_ONLY else CATEGORIES
MID_E2M1 = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _quiet_import():
    """torchao prints warnings about its optional CUDA libraries on import; keep output clean."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import gguf  # noqa: F401
        from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor  # noqa: F401
    logging.disable(logging.NOTSET)
    return gguf, mx_tensor, nvfp4_tensor


gguf, mx_tensor, nvfp4_tensor = _quiet_import()
import torch  # noqa: E402  (after torchao's import noise is silenced)

GGUF_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
              "q4_k": gguf.GGMLQuantizationType.Q4_K, "iq4_nl": gguf.GGMLQuantizationType.IQ4_NL}
BLOCK = {"mxfp4": 32, "nvfp4": 16, "q4_0": 32, "q4_1": 32, "q4_k": 256, "iq4_nl": 32}


# ---- the anchors ---------------------------------------------------------------------------
def anchor_quantize(x: np.ndarray, quant_type: str, tensor_scale=None) -> dict:
    """The anchor's bytes for a 2-D float32 (or bf16-valued float32) array: packed, scales,
    dequantized float32 (all uint8 / float32 NumPy arrays, flat)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if quant_type == "mxfp4":
        scale, data = mx_tensor.to_mx(t, torch.float4_e2m1fn_x2, 32)
        out = mx_tensor.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
        return {"packed": data.view(torch.uint8).numpy().ravel(),
                "scales": scale.view(torch.uint8).numpy().ravel(), "values": out.numpy().ravel()}
    if quant_type == "nvfp4":
        g = None if tensor_scale is None else torch.tensor(F32(tensor_scale))
        scale, data = nvfp4_tensor.nvfp4_quantize(t, 16, g)
        wrapped = nvfp4_tensor.NVFP4Tensor(data, scale, 16, torch.float32, per_tensor_scale=g)
        out = wrapped.dequantize(torch.float32)
        return {"packed": data.view(torch.uint8).numpy().ravel(),
                "scales": scale.view(torch.uint8).numpy().ravel(), "values": out.numpy().ravel()}
    with np.errstate(all="ignore"):
        blocks = gguf.quants.quantize(np.ascontiguousarray(x, dtype=F32), GGUF_TYPES[quant_type])
        values = gguf.quants.dequantize(blocks, GGUF_TYPES[quant_type])
    return {"packed": blocks.ravel(), "values": values.ravel()}


def anchor_tensor_scale(x: np.ndarray) -> np.float32:
    """torchao's ``per_tensor_amax_to_scale(amax(|x|))``."""
    amax = torch.from_numpy(np.ascontiguousarray(x)).abs().max()
    return F32(nvfp4_tensor.per_tensor_amax_to_scale(amax).item())


def anchor_dequantize(blocks: np.ndarray, quant_type: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(blocks, GGUF_TYPES[quant_type]).ravel()


# ---- q4lab, the same bytes -----------------------------------------------------------------
def q4lab_quantize(x: np.ndarray, quant_type: str, tensor_scale=None, backend="reference"):
    import q4lab

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    packed, state = q4lab.quantize_4bit(t, quant_type=quant_type, backend=backend,
                                        tensor_scale=tensor_scale)
    values = q4lab.dequantize_4bit(packed, state, torch.float32, backend=backend)
    out = {"packed": packed.numpy().ravel(), "values": values.numpy().ravel()}
    if state.absmax is not None:
        out["scales"] = state.absmax.numpy().ravel()
    return out


def q4lab_dequantize(blocks: np.ndarray, shape, quant_type: str, backend="reference"):
    import q4lab
    from q4lab.reference.block_formats import state_from_gguf

    packed, state = state_from_gguf(blocks, shape, quant_type)
    out = q4lab.dequantize_4bit(torch.from_numpy(packed), state.to("cpu"), torch.float32,
                                backend=backend)
    return out.numpy().ravel()


def differing(expected: dict, got: dict) -> dict:
    """{name: (k differing bytes, n bytes, first index)} for every array that differs."""
    result = {}
    for name, a in expected.items():
        b = got.get(name)
        ab = np.ascontiguousarray(a).view(np.uint8).ravel()
        bb = np.ascontiguousarray(b).view(np.uint8).ravel() if b is not None else None
        if bb is None or ab.size != bb.size:
            result[name] = ("size", ab.size, None if bb is None else bb.size)
            continue
        diff = np.flatnonzero(ab != bb)
        if diff.size:
            result[name] = (int(diff.size), int(ab.size), int(diff[0]))
    return result


# ---- adversarial cases ---------------------------------------------------------------------
def _grid_points(quant_type: str, rng, n: int) -> np.ndarray:
    """Values on the format's rounding boundaries at scale 1 (ties), with ±1 ulp neighbours."""
    if quant_type in ("mxfp4", "nvfp4"):
        base = np.array(MID_E2M1, dtype=F32)
    elif quant_type == "q4_0":
        base = (np.arange(16, dtype=F32) - F32(8.5))  # x / d + 8.5 lands on an integer
    else:
        base = np.arange(16, dtype=F32) + F32(0.5) - F32(8)
    v = rng.choice(base, n) * rng.choice([-1, 1], n).astype(F32)
    nudge = rng.integers(-1, 2, n)
    v = np.where(nudge > 0, np.nextafter(v, F32(np.inf)), v)
    return np.where(nudge < 0, np.nextafter(v, F32(-np.inf)), v).astype(F32)


def _anchor_block(quant_type: str, rng, block: int, scale: float) -> np.ndarray:
    """One block whose scale is exactly ``scale`` (a power of two) and values on ties."""
    values = (_grid_points(quant_type, rng, block) * F32(scale)).astype(F32)
    first = int(rng.integers(block))
    if quant_type in ("mxfp4", "nvfp4"):
        values[first] = F32(6 * scale) * rng.choice([-1, 1])   # amax 6·2^e: scale 2^e (nvfp4)
        if quant_type == "mxfp4":
            values[first] = F32(4 * scale) * rng.choice([-1, 1])  # floor(log2 4·2^e) - 2 = e
    elif quant_type == "q4_0":
        values[first] = F32(-8 * scale)  # d = -8s / -8 = s
    else:
        values[:2] = [F32(-8 * scale), F32(7 * scale)]  # d = 15 s / 15
    return values


def draw_case(seed: int, quant_type: str, category: str) -> dict:
    """One case: a 2-D float32 array (or None for the dequantize-only formats) and its context."""
    rng = np.random.default_rng(seed)
    block = BLOCK[quant_type]
    rows, per_row = int(rng.integers(1, 5)), int(rng.integers(1, 7))
    cols = block * per_row
    if quant_type in DEQUANT_ONLY:
        return _dequant_case(rng, quant_type, rows, per_row, category)
    exp_lo, exp_hi = {"mxfp4": (-120, 120), "nvfp4": (-20, 20)}.get(quant_type, (-20, 12))
    scale = 2.0 ** int(rng.integers(exp_lo, exp_hi))
    x = (rng.standard_normal((rows, cols)) * scale).astype(F32)
    if category in ("ties", "max_6x2e"):
        e_lo, e_hi = {"nvfp4": (-6, 7)}.get(quant_type, (exp_lo, exp_hi))
        blocks = [_anchor_block(quant_type, rng, block, 2.0 ** int(rng.integers(e_lo, e_hi)))
                  for _ in range(rows * per_row)]
        x = np.concatenate(blocks).reshape(rows, cols)
        if category == "max_6x2e":  # the block max itself, exactly and ±1 ulp
            top = np.abs(x).argmax(axis=1)
            peak = F32(6.0 if quant_type in ("mxfp4", "nvfp4") else 8.0) * F32(
                2.0 ** int(rng.integers(e_lo, e_hi)))
            peak = [peak, np.nextafter(peak, F32(0)), np.nextafter(peak, F32(np.inf))][
                int(rng.integers(3))]
            x[np.arange(rows), top] = peak * rng.choice([-1, 1])
    elif category == "subnormal":
        tiny = {"mxfp4": [2.0 ** -149, 2.0 ** -140, 2.0 ** -127, 2.0 ** -124],
                "nvfp4": [2.0 ** -14, 2.0 ** -10, 2.0 ** -6, 2.0 ** -9]}.get(
            quant_type, [2.0 ** -30, 2.0 ** -24, 2.0 ** -16, 2.0 ** -149])
        x = (rng.standard_normal((rows, cols)) * rng.choice(tiny)).astype(F32)
    elif category == "zero_blocks":
        mask = rng.random(rows * per_row) < 0.5
        x = x.reshape(-1, block)
        x[mask] = np.where(rng.random((int(mask.sum()), block)) < 0.5, F32(0.0), F32(-0.0))
        x = x.reshape(rows, cols)
    elif category == "ragged_rows":
        x = x[:, :cols - int(rng.integers(1, block))] if cols > block or rng.random() < 0.5 \
            else np.concatenate([x, x[:, :1]], axis=1)
    elif category == "nonfinite":
        x.ravel()[int(rng.integers(x.size))] = rng.choice([np.nan, np.inf, -np.inf])
    elif category == "bf16_input":
        x = torch.from_numpy(x).bfloat16().float().numpy()
    elif category == "huge":
        big = {"mxfp4": 3e38, "nvfp4": 1e4}.get(quant_type, float(rng.choice([6e4, 2e5, 5e5])))
        x = np.clip(rng.standard_normal((rows, cols)) * big, -3.4e38, 3.4e38).astype(F32)
    g = None
    if quant_type == "nvfp4" and rng.random() < 0.5 and category not in ("nonfinite",
                                                                         "ragged_rows"):
        g = anchor_tensor_scale(x) if rng.random() < 0.8 else F32(2.0 ** rng.integers(-8, 4))
        g = None if not np.isfinite(F32(1) / g) or g == 0 else g
    return {"seed": seed, "quant_type": quant_type, "category": category,
            "x": np.ascontiguousarray(x, dtype=F32), "tensor_scale": g,
            "bf16": category == "bf16_input"}


def _dequant_case(rng, quant_type, rows, per_row, category) -> dict:
    """Random GGUF block bytes; categories pick the fp16 scales (zero, subnormal, huge, NaN)."""
    nbytes = {"q4_k": 144, "iq4_nl": 18}[quant_type]
    blocks = rng.integers(0, 256, (rows * per_row, nbytes), dtype=np.uint8)
    halves = {"zero_blocks": [0.0, -0.0], "subnormal": [2.0 ** -24, 2.0 ** -20, 6e-5],
              "huge": [65504.0, 30000.0], "nonfinite": [np.inf, np.nan]}.get(category)
    if halves is not None:
        d = rng.choice(halves, (rows * per_row, 2)).astype(np.float16)
        blocks[:, :4] = d.view(np.uint8).reshape(-1, 4)
    else:  # random: ordinary fp16 scales
        d = (rng.standard_normal((rows * per_row, 2)) * 0.01).astype(np.float16)
        blocks[:, :4] = d.view(np.uint8).reshape(-1, 4)
    return {"quant_type": quant_type, "category": category,
            "blocks": blocks.reshape(rows, -1), "shape": (rows, per_row * BLOCK[quant_type])}


def run_case(case: dict, backend: str = "reference") -> dict:
    """Compare q4lab with the anchor on one case: {"status": "equal" | "refused" | "differ",
    ...}. "refused": q4lab raised ValueError and the anchor refused or gave a non-finite scale."""
    qt = case["quant_type"]
    if qt in DEQUANT_ONLY:
        expected = anchor_dequantize(case["blocks"], qt)
        got = q4lab_dequantize(case["blocks"], case["shape"], qt, backend)
        diff = differing({"values": expected}, {"values": got})
        return {"status": "differ" if diff else "equal", "diff": diff}
    x = case["x"]
    if case["bf16"]:
        x_in = torch.from_numpy(x).bfloat16()
    else:
        x_in = torch.from_numpy(x)
    try:
        got = q4lab_quantize(x_in, qt, case["tensor_scale"], backend)
    except ValueError as exc:
        return {"status": "refused" if _anchor_refuses(x, qt, case["tensor_scale"]) else
                "differ", "reason": str(exc)[:200]}
    x_anchor = x_in.numpy() if not case["bf16"] else x
    if case["bf16"] and qt in ("mxfp4", "nvfp4"):
        expected = anchor_quantize_bf16(x_in, qt, case["tensor_scale"])
    else:
        expected = anchor_quantize(x_anchor, qt, case["tensor_scale"])
    diff = differing(expected, got)
    return {"status": "differ" if diff else "equal", "diff": diff}


def anchor_quantize_bf16(x_bf16, quant_type, tensor_scale):
    """torchao takes bfloat16 input directly: pass it as bf16 (it converts to float32)."""
    t = x_bf16
    if quant_type == "mxfp4":
        scale, data = mx_tensor.to_mx(t, torch.float4_e2m1fn_x2, 32)
        out = mx_tensor.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    else:
        g = None if tensor_scale is None else torch.tensor(F32(tensor_scale))
        scale, data = nvfp4_tensor.nvfp4_quantize(t, 16, g)
        out = nvfp4_tensor.NVFP4Tensor(data, scale, 16, torch.float32,
                                       per_tensor_scale=g).dequantize(torch.float32)
    return {"packed": data.view(torch.uint8).numpy().ravel(),
            "scales": scale.view(torch.uint8).numpy().ravel(), "values": out.numpy().ravel()}


def _anchor_refuses(x: np.ndarray, quant_type: str, tensor_scale) -> bool:
    """True if ``x`` holds NaN/Inf (q4lab refuses them all; torchao turns a NaN block into
    E8M0 255 / E4M3 NaN and saturates ±Inf to ±6, gguf writes NaN scales), or the anchor raises
    on ``x``, or writes a non-finite scale or value for it."""
    if not np.isfinite(x).all():
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = anchor_quantize(x, quant_type, tensor_scale)
    except Exception:
        return True
    if quant_type == "mxfp4" and (out["scales"] == 255).any():
        return True
    if quant_type == "nvfp4" and ((out["scales"] & 0x7F) == 0x7F).any():
        return True
    return not np.isfinite(out["values"]).all()
