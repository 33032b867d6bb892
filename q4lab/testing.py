"""Shared test material: ``sample_inputs()`` and pytest-free byte assertions.

Style after torchao's nvfp4 reference tests and llm.c's ``validate_result``: every comparison is of
bytes, and a failure says how many differ, where the first one is, and what was expected there
("37/65536 bytes differ, first at 1204 (expected 0x7a, got 0x7b)"). Used by the test suite, the
kernel parity sweeps and the notebooks (NumPy only; torch tensors are accepted and converted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reference.blockwise import BLOCKSIZES
from .reference.codebooks import fp4_codebook, nf4_codebook, thresholds

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


def assert_states_equal(expected, got, what: str = "") -> None:
    """Compare two QuantStates field by field, bytes for arrays."""
    tag = f"{what}: " if what else ""
    for name in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        a, b = getattr(expected, name), getattr(got, name)
        if tuple(a) != tuple(b) if name == "shape" else a != b:
            raise AssertionError(f"{tag}state.{name}: expected {a!r}, got {b!r}")
    assert_bytes_equal(expected.absmax, got.absmax, f"{tag}absmax")
    if expected.nested:
        assert_bytes_equal(np.float32(expected.offset_value), np.float32(got.offset_value),
                           f"{tag}offset")
        assert_bytes_equal(expected.state2.absmax, got.state2.absmax, f"{tag}nested absmax")


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
    """float32 values made exactly representable in ``dtype`` (so every path sees the same input)."""
    from .reference.api import round_to_bfloat16

    x = np.asarray(x, dtype=F32)
    if dtype == "float16":
        return x.astype(np.float16).astype(F32)
    if dtype == "bfloat16":
        return round_to_bfloat16(x)
    return x


def boundary_values(quant_type: str) -> np.ndarray:
    """Every threshold t_k and its float32 neighbours one ulp either side, both signs, plus ±0,
    ±1 and the codebook values themselves: the inputs where a rounding rule shows."""
    t = thresholds(quant_type)
    near = np.concatenate([t, np.nextafter(t, F32(-2)), np.nextafter(t, F32(2))])
    table = nf4_codebook() if quant_type == "nf4" else fp4_codebook()
    vals = np.concatenate([near, -near, table, [0.0, -0.0, 1.0, -1.0]]).astype(F32)
    return vals


def _adversarial(rng, n: int, quant_type: str) -> np.ndarray:
    """Blocks whose absmax is exactly 1 (a leading ±1), so the scaled values equal the raw ones and
    every threshold / ±1 ulp value is hit exactly."""
    vals = boundary_values(quant_type)
    x = rng.choice(vals, size=n).astype(F32)
    return x


def sample_inputs(seed: int = 0, small: bool = False):
    """A list of :class:`Sample` covering every rounding bucket of DESIGN.md §4.

    Kinds: Gaussian; heavy-tailed (Student t, 2 dof); values exactly at every threshold and one ulp
    either side (blocks with absmax 1); ±0 and signed zeros; subnormals (whole subnormal blocks,
    and subnormals beside normal values); all-zero blocks; huge magnitudes (absmax >= 2^126);
    tails (n not a multiple of blocksize) and odd n; every blocksize; fp32/fp16/bf16; nf4/fp4;
    with and without double quantization. ``small`` keeps only a representative subset."""
    rng = np.random.default_rng(seed)
    out = []
    blocksizes = (32, 64, 256, 4096) if small else BLOCKSIZES

    def add(name, x, dtype="float32", bs=64, qt="nf4", dq=True):
        x = round_to_dtype(np.asarray(x, dtype=F32), dtype)
        out.append(Sample(name, x, dtype, bs, qt, dq))

    for qt in ("nf4", "fp4"):
        for bs in blocksizes:
            for dtype in ("float32", "float16", "bfloat16"):
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
        # quantization their absmax would decode below zero (signs flipped, -0.0 zeros)
        beside = rng.standard_normal((64, 64)).astype(F32)
        beside[1] = 0.0
        beside[2] *= 0.003
        beside[3, 0] = 4.99624
        add(f"tiny-beside-outlier-{qt}", beside, "float32", 64, qt)
        many_blocks = rng.standard_normal(32 * 700) * rng.gamma(2.0, size=32 * 700)
        add(f"nested-groups-{qt}", many_blocks, "float32", 32, qt)  # 700 blocks: 3 nested groups
    if small:
        out = out[::3] + [s for s in out if not s.name.startswith("randn")]
    return out
