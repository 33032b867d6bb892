"""The C++ kernels (``csrc/q4_cpu.cpp``, ``torch.ops.q4lab.*``) against the NumPy reference, byte
for byte (DESIGN.md §4, §5).

Style of pytorch/extension-cpp ``test/test_extension.py`` (sample inputs + ``torch.library.opcheck``)
and torchao's nvfp4 reference tests (every comparison is of bytes: "k/n bytes differ, first at i").
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import q4lab
from q4lab import _build, _gen_tables, _kernels, ops
from q4lab import reference as ref
from q4lab.reference.double_quant import exact_mean_f32
from q4lab.testing import assert_bytes_equal, boundary_values, round_to_dtype, sample_inputs

F32 = np.float32
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    status = _kernels.available("cpu")
    assert status is True, f"the C++ kernels must build here: {status}"


def as_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=F32)).to(TORCH[dtype])


def check_parity(x, dtype, blocksize, quant_type, double_quant, offset=None, what=""):
    """Quantize with the reference and the C++ kernel; compare every output and every dequant."""
    x = round_to_dtype(np.asarray(x, dtype=F32), dtype)
    p_ref, s_ref = ref.quantize_4bit(x, blocksize, quant_type, double_quant, offset=offset,
                                     dtype=dtype)
    p_cpu, s_cpu = q4lab.quantize_4bit(as_torch(x, dtype), blocksize, quant_type, double_quant,
                                       backend="cpu", offset=offset)
    assert_bytes_equal(p_ref, p_cpu, f"{what} packed")
    assert_bytes_equal(s_ref.absmax, s_cpu.absmax, f"{what} absmax/codes")
    if double_quant:
        assert_bytes_equal(np.asarray(s_ref.offset, F32), s_cpu.offset.reshape(()), f"{what} offset")
        assert_bytes_equal(s_ref.state2.absmax, s_cpu.state2.absmax, f"{what} absmax2")
        assert_bytes_equal(ref.state_absmax(s_ref), ops.absmax_of(s_cpu, "cpu"),
                           f"{what} dequantized absmax")
    for out in ("float32", "float16", "bfloat16"):
        expected = ref.dequantize_4bit(p_ref, s_ref, out)
        if out == "bfloat16":
            expected = torch.from_numpy(expected).to(torch.bfloat16)  # exact: already bf16 values
        got = q4lab.dequantize_4bit(p_cpu, s_cpu, dtype=TORCH[out], backend="cpu")
        assert_bytes_equal(expected, got, f"{what} dequantized {out}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("sample", sample_inputs(), ids=lambda s: s.name)
def test_sample_inputs_parity(sample):
    check_parity(sample.x, sample.dtype, sample.blocksize, sample.quant_type, sample.double_quant,
                 what=repr(sample))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_int4_and_boundaries_parity(quant_type):
    """Every threshold and its ±1 ulp neighbours (absmax exactly 1 per block), all three types."""
    t = ref.thresholds(quant_type)
    near = np.concatenate([t, np.nextafter(t, F32(-2)), np.nextafter(t, F32(2))])
    vals = np.concatenate([near, -near, [0.0, -0.0]]).astype(F32)
    x = np.resize(vals, 64 * ((vals.size + 62) // 63 + 1)).astype(F32)
    x[::64] = 1.0
    check_parity(x, "float32", 64, quant_type, True, what=quant_type)


def _values(draw, n: int, quant_type: str) -> np.ndarray:
    kind = draw(st.sampled_from(["normal", "boundary", "subnormal", "huge", "zeros", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        return rng.standard_normal(n) * 10.0 ** draw(st.integers(-30, 30))
    if kind == "boundary":
        x = rng.choice(boundary_values(quant_type), n)
        x[:: draw(st.sampled_from([32, 64, 128]))] = draw(st.sampled_from([1.0, -1.0]))
        return x
    if kind == "subnormal":
        return rng.standard_normal(n) * draw(st.sampled_from([1e-45, 1e-42, 1e-39, 2.0**-126]))
    if kind == "huge":
        return rng.standard_normal(n) * draw(st.sampled_from([2.0**100, 2.0**126, 3e38 / 4]))
    if kind == "zeros":
        return np.where(rng.random(n) < 0.5, 0.0, -0.0)
    x = rng.standard_normal(n) * 0.02
    x[rng.random(n) < 0.2] = 0.0
    x[rng.random(n) < 0.05] *= 1e-38
    return x


@st.composite
def cases(draw):
    quant_type = draw(st.sampled_from(["nf4", "fp4", "int4"]))
    blocksize = draw(st.sampled_from(ref.BLOCKSIZES))
    n = draw(st.one_of(st.integers(1, 3 * blocksize + 1), st.integers(8192, 20000)))  # >256 blocks
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    with np.errstate(over="ignore"):
        x = np.clip(_values(draw, n, quant_type), -3e38, 3e38).astype(F32)
    if dtype == "float16":
        x = np.clip(x, -65504, 65504).astype(F32)
    return x, dtype, blocksize, quant_type, draw(st.booleans())


@settings(max_examples=int(os.environ.get("Q4LAB_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_hypothesis_parity(case):
    x, dtype, blocksize, quant_type, double_quant = case
    check_parity(x, dtype, blocksize, quant_type, double_quant,
                 what=f"n={x.size} {dtype} bs={blocksize} {quant_type} dq={double_quant}")


def test_offset_given_matches_reference():
    """bitsandbytes' offset is torch's float32 mean; handed over, both paths use it as is."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(64 * 900) * rng.gamma(2.0, size=64 * 900)).astype(F32)
    absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
    bnb_style = torch.from_numpy(absmax).mean()  # float32, order-dependent
    check_parity(x, "float32", 64, "nf4", True, offset=bnb_style.item(), what="given offset")


@pytest.mark.parametrize("count", [1, 255, 256, 257, 70_000, 300_001])
def test_exact_mean_offset(count):
    """The offset is the exact mean rounded once (multi-limb integer division in C++)."""
    rng = np.random.default_rng(count)
    vals = np.abs(rng.standard_normal(count) * 10.0 ** rng.integers(-44, 38, count)).astype(F32)
    _, _, off = _kernels.quantize_absmax(torch.from_numpy(vals))
    assert_bytes_equal(exact_mean_f32(vals), off.reshape(()), f"offset of {count} values")


def test_exact_mean_rounding_edges():
    """Ties and round-ups that a float64 mean would get wrong."""
    cases = [np.array([1.0, np.nextafter(F32(1), F32(2))], F32),        # tie -> even
             np.array([1 + 2.0**-23, 1 + 2.0**-22], F32),                # tie, odd -> up
             np.array([1.0, 1.0, np.nextafter(F32(1), F32(2))], F32),   # below half
             np.array([3e38, 3e38, 3e38], F32),                          # huge sum
             np.array([1.4e-45, 0.0, 0.0], F32),                         # subnormal / 3
             np.array([np.nextafter(F32(2**24), F32(0))] * 7 + [2.0**24], F32)]
    for vals in cases:
        _, _, off = _kernels.quantize_absmax(torch.from_numpy(vals))
        assert_bytes_equal(exact_mean_f32(vals), off.reshape(()), f"mean of {vals}")


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_non_finite_names_block(kind, dtype):
    x = torch.randn(64 * 10 + 3).to(TORCH[dtype])
    x[64 * 7 + 5] = float(kind)
    _, absmax = _kernels.quantize_4bit(x, 64, "nf4")
    assert not torch.isfinite(absmax[7]) and bool(torch.isfinite(absmax[:7]).all())
    with pytest.raises(ValueError, match=r"flat index 453 \(block 7\)"):
        q4lab.quantize_4bit(x, 64, backend="cpu")


def test_auto_picks_cpu_kernel():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert q4lab.backends()["cpu"] is True
    assert isinstance(q4lab.backends()["cuda"], (bool, str))


def _poisoned(shape, dtype):
    return torch.full(shape, 0xAA, dtype=torch.uint8).view(dtype) if dtype == torch.uint8 else \
        torch.full((int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size(),), 0xAA,
                   dtype=torch.uint8).view(dtype).reshape(shape)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1001, 4096 * 3 + 17])
def test_poisoned_outputs_fully_written(n):
    x = torch.randn(n)
    q = torch.ops.q4lab
    packed, absmax = q.quantize_4bit(x, 64, "nf4")
    p2, a2 = _poisoned(packed.shape, torch.uint8), _poisoned(absmax.shape, torch.float32)
    q.quantize_4bit_out(x, 64, "nf4", p2, a2)
    assert_bytes_equal(packed, p2, "packed")
    assert_bytes_equal(absmax, a2, "absmax")
    codes, absmax2, off = q.quantize_absmax(absmax, None)
    c3, m3, o3 = (_poisoned(codes.shape, torch.uint8), _poisoned(absmax2.shape, torch.float32),
                  _poisoned((), torch.float32))
    q.quantize_absmax_out(absmax, None, c3, m3, o3)
    for e, g, what in [(codes, c3, "codes"), (absmax2, m3, "absmax2"), (off, o3, "offset")]:
        assert_bytes_equal(e, g, what)
    deq = q.dequantize_absmax(codes, absmax2, off)
    d4 = _poisoned(deq.shape, torch.float32)
    q.dequantize_absmax_out(codes, absmax2, off, d4)
    assert_bytes_equal(deq, d4, "dequantized absmax")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = q.dequantize_4bit(packed, absmax, 64, "nf4", n, dtype)
        o5 = _poisoned((n,), dtype)
        q.dequantize_4bit_out(packed, absmax, 64, "nf4", n, o5)
        assert_bytes_equal(out, o5, f"dequantized {dtype}")


def _opcheck_cases():
    x = torch.randn(64 * 5 + 3)
    packed, absmax = torch.ops.q4lab.quantize_4bit(x, 64, "fp4")
    codes, absmax2, off = torch.ops.q4lab.quantize_absmax(absmax, None)
    q = torch.ops.q4lab
    return [
        (q.quantize_4bit.default, (x.bfloat16(), 64, "nf4")),
        (q.quantize_4bit.default, (x, 32, "fp4")),
        (q.quantize_absmax.default, (absmax, None)),
        (q.quantize_absmax.default, (absmax, torch.tensor(0.25))),
        (q.dequantize_absmax.default, (codes, absmax2, off)),
        (q.dequantize_4bit.default, (packed, absmax, 64, "fp4", x.numel(), torch.bfloat16)),
        (q.dequantize_4bit_out.default,
         (packed, absmax, 64, "fp4", x.numel(), torch.empty(x.numel()))),
        (q.quantize_4bit_out.default, (x, 64, "nf4", torch.empty_like(packed),
                                       torch.empty_like(absmax))),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.q4lab.quantize_4bit(torch.randn(64), 48, "nf4"), "blocksize=48"),
    (lambda: torch.ops.q4lab.quantize_4bit(torch.randn(64), 64, "nf5"), "quant_type='nf5'"),
    (lambda: torch.ops.q4lab.quantize_4bit(torch.randn(64).double(), 64, "nf4"), "Double"),
    (lambda: torch.ops.q4lab.quantize_4bit(torch.randn(8, 8), 64, "nf4"), "1-D"),
    (lambda: torch.ops.q4lab.dequantize_4bit(torch.zeros(5, dtype=torch.uint8), torch.ones(1),
                                             64, "nf4", 11, torch.float32), "needs 6"),
    (lambda: torch.ops.q4lab.quantize_absmax(torch.tensor([1.0, float("nan")]), None), "NaN"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_tables_header_is_generated_from_reference():
    current = _gen_tables.HEADER_PATH.read_text()
    assert current == _gen_tables.render(), "csrc/q4_tables.h is stale: python -m q4lab._gen_tables"


def test_extension_name_tracks_every_csrc_file(tmp_path):
    src = _build.csrc_dir()
    for path in src.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = _build.extension_name(tmp_path, False)
    header = tmp_path / "q4_element.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _build.extension_name(tmp_path, False) != before
    assert _build.extension_name(src, False) == _build.extension_name(src, False)


def test_cached_load_is_quiet_and_fast():
    code = ("import time, torch; from q4lab import _kernels; t = time.perf_counter(); "
            "assert _kernels.available('cpu') is True; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stderr, done.stderr
    assert float(done.stdout.strip()) < 5.0
