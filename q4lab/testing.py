"""Shared test material: ``sample_inputs()``, pytest-free byte assertions, and the one
reference-vs-kernel comparison (``parity_mismatches``).

Style after torchao's nvfp4 reference tests and llm.c's ``validate_result``: every comparison is of
bytes, and a failure says how many differ, where the first one is, and what was expected there
("37/65536 bytes differ, first at 1204 (expected 0x7a, got 0x7b)"). Used by the test suite, the
kernel parity sweep (``bench/sweep_parity.py``) and the notebooks. NumPy only at import; torch
tensors are accepted and converted, and ``parity_mismatches`` imports torch when called.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import BLOCKSIZES, BNB_QUANT_TYPES, DTYPES, NESTED_BLOCKSIZE
from .reference.codebooks import codebook, thresholds

F32 = np.float32


def _as_bytes(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor: view its storage bytes (bf16 included)
        t = a.detach().cpu().contiguous()
        import torch

        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        a = t.numpy()
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def byte_mismatch(expected, got) -> str | None:
    """None if the two arrays have identical bytes, else a one-line description."""
    e, g = _as_bytes(expected), _as_bytes(got)
    if e.size != g.size:
        return f"sizes differ: expected {e.size} bytes, got {g.size}"
    diff = np.flatnonzero(e != g)
    if diff.size == 0:
        return None
    i = int(diff[0])
    return (f"{diff.size}/{e.size} bytes differ, first at {i} "
            f"(expected 0x{e[i]:02x}, got 0x{g[i]:02x})")


def assert_bytes_equal(expected, got, what: str = "") -> None:
    """Raise AssertionError unless ``expected`` and ``got`` are identical byte for byte."""
    msg = byte_mismatch(expected, got)
    if msg is not None:
        raise AssertionError(f"{what}: {msg}" if what else msg)


def state_mismatches(expected, got) -> dict:
    """``{part: description}`` for every field of two QuantStates that differs (arrays compared as
    bytes: absmax or nested codes, offset, nested absmax); ``{}`` when they are identical."""
    for name in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        a, b = getattr(expected, name), getattr(got, name)
        if tuple(a) != tuple(b) if name == "shape" else a != b:
            return {f"state.{name}": f"expected {a!r}, got {b!r}"}
    pairs = [("absmax", expected.absmax, got.absmax)]
    if expected.nested:
        pairs += [("offset", np.float32(expected.offset_value), np.float32(got.offset_value)),
                  ("nested absmax", expected.state2.absmax, got.state2.absmax)]
    return _mismatches(pairs)


def _mismatches(pairs) -> dict:
    found = {}
    for name, a, b in pairs:
        msg = byte_mismatch(a, b)
        if msg is not None:
            found[name] = msg
    return found


def describe(mismatches: dict) -> str:
    """One line from a ``{part: description}`` dict: ``"packed: 3/40 bytes differ, ...; ..."``."""
    return "; ".join(f"{k}: {v}" for k, v in mismatches.items())


def assert_states_equal(expected, got, what: str = "") -> None:
    """Compare two QuantStates field by field, bytes for arrays."""
    found = state_mismatches(expected, got)
    if found:
        raise AssertionError((f"{what}: " if what else "") + describe(found))


def parity_mismatches(x, dtype: str = "float32", blocksize: int = 64, quant_type: str = "nf4",
                      double_quant: bool = True, *, backend: str = "cpu", offset=None,
                      out_dtypes=DTYPES) -> dict:
    """Quantize ``x`` with the NumPy reference and with ``q4lab.quantize_4bit(...,
    backend=backend)`` (on the GPU for "cuda"), dequantize both to each of ``out_dtypes``, and
    compare every output byte for byte. Returns ``{part: "k/n bytes differ, first at i
    (expected .., got ..)"}`` for each part that differs (packed, state fields, absmax or nested
    codes, offset, nested absmax, decoded absmax, dequantized <dtype>); ``{}`` when every byte
    agrees. ``x`` is first made exactly representable in ``dtype`` (``round_to_dtype``), so both
    sides quantize the same values. ``offset`` (double quant) is handed to both sides."""
    import torch

    from . import ops
    from . import reference as ref

    x = round_to_dtype(np.ascontiguousarray(x, dtype=F32), dtype)
    p_ref, s_ref = ref.quantize_4bit(x, blocksize, quant_type, double_quant, offset=offset,
                                     dtype=dtype)
    w = torch.from_numpy(x).to(ops.DTYPE_OF_NAME[dtype])
    w = w.cuda() if backend == "cuda" else w
    packed, state = ops.quantize_4bit(w, blocksize, quant_type, double_quant, backend=backend,
                                      offset=offset)
    found = _mismatches([("packed", p_ref, packed)])
    found.update(state_mismatches(s_ref, state))
    if double_quant and not found:
        found.update(_mismatches([("decoded absmax", ref.state_absmax(s_ref),
                                   ops.absmax_of(state, backend))]))
    for name in out_dtypes:
        want = ref.dequantize_4bit(p_ref, s_ref, name)
        if name == "bfloat16":  # float32 holding bf16 values: exact as torch bfloat16
            want = torch.from_numpy(want).to(torch.bfloat16)
        got = ops.dequantize_4bit(packed, state, dtype=ops.DTYPE_OF_NAME[name], backend=backend)
        found.update(_mismatches([(f"dequantized {name}", want, got)]))
    return found


def assert_parity(x, dtype: str = "float32", blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, *, what: str = "", **kwargs) -> None:
    """Raise AssertionError naming every differing part unless :func:`parity_mismatches` is
    empty."""
    found = parity_mismatches(x, dtype, blocksize, quant_type, double_quant, **kwargs)
    if found:
        raise AssertionError((f"{what}: " if what else "") + describe(found))


@dataclass
class Sample:
    """One named test input: ``x`` is float32 (bf16/fp16 samples hold exactly representable
    values), ``dtype`` the dtype to quantize it as."""

    name: str
    x: np.ndarray
    dtype: str
    blocksize: int
    quant_type: str
    double_quant: bool

    def __repr__(self) -> str:
        return (f"Sample({self.name}, shape={self.x.shape}, {self.dtype}, bs={self.blocksize}, "
                f"{self.quant_type}, dq={self.double_quant})")


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values made exactly representable in ``dtype``, so every path sees the same input."""
    from .reference.api import round_to_bfloat16

    x = np.asarray(x, dtype=F32)
    if dtype == "float16":
        return x.astype(np.float16).astype(F32)
    if dtype == "bfloat16":
        return round_to_bfloat16(x)
    return x


def boundary_values(quant_type: str) -> np.ndarray:
    """Every threshold t_k of ``quant_type`` and its float32 neighbours one ulp either side, both
    signs, plus ±0, ±1 and the type's own codebook values: the inputs where a rounding rule
    shows."""
    t = thresholds(quant_type)
    near = np.concatenate([t, np.nextafter(t, F32(-2)), np.nextafter(t, F32(2))])
    return np.concatenate([near, -near, codebook(quant_type), [0.0, -0.0, 1.0, -1.0]]).astype(F32)


def _adversarial(rng, n: int, quant_type: str) -> np.ndarray:
    """Blocks whose absmax is exactly 1 (a leading ±1), so the scaled values equal the raw ones and
    every threshold / ±1 ulp value is hit exactly."""
    vals = boundary_values(quant_type)
    x = rng.choice(vals, size=n).astype(F32)
    return x


def sample_inputs(seed: int = 0, small: bool = False):
    """A list of :class:`Sample` covering every rounding bucket of docs/format.md §1-§8.

    Kinds: Gaussian; heavy-tailed (Student t, 2 dof); values exactly at every threshold and one ulp
    either side (blocks with absmax 1); ±0 and signed zeros; subnormals (whole subnormal blocks,
    and subnormals beside normal values); all-zero blocks; huge magnitudes (absmax >= 2^126);
    tails (n not a multiple of blocksize) and odd n; every blocksize; fp32/fp16/bf16; nf4/fp4;
    with and without double quantization. ``small`` keeps only a representative subset."""
    rng = np.random.default_rng(seed)
    out = []
    blocksizes = (BLOCKSIZES[0], 64, 256, BLOCKSIZES[-1]) if small else BLOCKSIZES

    def add(name, x, dtype="float32", bs=64, qt="nf4", dq=True):
        x = round_to_dtype(np.asarray(x, dtype=F32), dtype)
        out.append(Sample(name, x, dtype, bs, qt, dq))

    for qt in BNB_QUANT_TYPES:
        for bs in blocksizes:
            for dtype in DTYPES:
                for dq in (True, False):
                    n = bs * 5 + 7  # tail block, odd n
                    add(f"randn-{qt}-{bs}-{dtype}-{int(dq)}",
                        rng.standard_normal(n) * 0.05, dtype, bs, qt, dq)
        boundary = _adversarial(rng, 64 * 40, qt)
        boundary[::64] = 1.0  # absmax exactly 1 in every block of 64
        add(f"thresholds-{qt}", boundary, "float32", 64, qt)
        add(f"thresholds-neg-{qt}", np.where(np.arange(boundary.size) % 64 == 0, -1.0, boundary),
            "float32", 64, qt)
        add(f"heavy-tails-{qt}", rng.standard_t(2, size=(37, 129)) * 0.02, "float32", 128, qt)
        add(f"signed-zeros-{qt}", np.tile([0.0, -0.0, 1e-3, -1e-3], 33), "float32", 32, qt)
        zeros = rng.standard_normal(64 * 6).astype(F32)
        zeros[64:128] = 0.0
        zeros[256:] = -0.0
        add(f"all-zero-blocks-{qt}", zeros, "float32", 64, qt)
        add(f"all-zero-tensor-{qt}", np.zeros(101, F32), "float32", 32, qt)
        sub = (rng.standard_normal(64 * 4) * 1e-40).astype(F32)  # subnormal blocks
        sub[64:128] = rng.standard_normal(64) * 1e-3
        sub[130] = 1.4e-45
        add(f"subnormals-{qt}", sub, "float32", 64, qt)
        add(f"tiny-normals-{qt}", rng.standard_normal(300) * 2.0**-120, "float32", 64, qt)
        add(f"huge-{qt}", rng.standard_normal(200) * 2.0**125, "float32", 64, qt)
        add(f"one-element-{qt}", [0.37], "float32", 64, qt)
        add(f"odd-3-{qt}", [-1.0, 0.5, 0.25], "bfloat16", 32, qt)
        add(f"matrix-{qt}", rng.standard_normal((48, 96)) * 0.02, "bfloat16", 64, qt)
        # tiny and all-zero blocks beside an outlier: without the non-negative rule of double
        # quantization their absmax would decode below zero (signs flipped, -0.0 zeros). A fixed
        # generator: these values are crafted (tests/test_reference.py checks the rule is needed)
        beside = np.random.default_rng(0).standard_normal((64, 64)).astype(F32)
        beside[1] = 0.0
        beside[2] *= 0.003
        beside[3, 0] = 4.99624
        add(f"tiny-beside-outlier-{qt}", beside, "float32", 64, qt)
        nblocks = 2 * NESTED_BLOCKSIZE + 188  # 700 blocks: 3 nested groups, the last one partial
        many_blocks = rng.standard_normal(32 * nblocks) * rng.gamma(2.0, size=32 * nblocks)
        add(f"nested-groups-{qt}", many_blocks, "float32", 32, qt)
    if small:
        out = out[::3] + [s for s in out if not s.name.startswith("randn")]
    return out
