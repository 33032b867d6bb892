"""The C++ kernels (``csrc/q4_cpu.cpp``, ``torch.ops.q4lab.*``) against the NumPy reference, byte
for byte (docs/format.md; docs/architecture.md §2, §3).

Style of pytorch/extension-cpp ``test/test_extension.py`` (sample inputs +
``torch.library.opcheck``) and torchao's nvfp4 reference tests (every comparison is of bytes: "k/n
bytes differ, first at i").
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import q4lab
from q4lab import _build, _gen_tables, _kernels, ops
from q4lab.constants import BLOCKSIZES, BNB_QUANT_TYPES, DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES
from q4lab.reference.double_quant import exact_mean_f32
from q4lab.testing import assert_bytes_equal, assert_parity, boundary_values, sample_inputs

F32 = np.float32
TORCH = ops.DTYPE_OF_NAME


@pytest.fixture(scope="module", autouse=True)
def kernels():
    status = _kernels.available("cpu")
    assert status is True, f"the C++ kernels must build here: {status}"


def check_parity(x, dtype, blocksize, quant_type, double_quant, offset=None, what=""):
    """Quantize with the reference and the C++ kernel; compare every output and every dequant
    (``q4lab.testing.parity_mismatches``: packed, state, offset, nested and decoded absmax, and the
    dequantized values in all three dtypes)."""
    assert_parity(x, dtype, blocksize, quant_type, double_quant, backend="cpu", offset=offset,
                  what=what)


@pytest.mark.parametrize("sample", sample_inputs(), ids=lambda s: s.name)
def test_sample_inputs_parity(sample):
    check_parity(sample.x, sample.dtype, sample.blocksize, sample.quant_type, sample.double_quant,
                 what=repr(sample))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_int4_and_boundaries_parity(quant_type):
    """Every threshold and its ±1 ulp neighbours, ±0, ±1 and the type's own levels
    (``testing.boundary_values``; absmax exactly 1 per block), all three types."""
    vals = boundary_values(quant_type)
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
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    n = draw(st.one_of(st.integers(1, 3 * blocksize + 1), st.integers(8192, 20000)))  # >256 blocks
    dtype = draw(st.sampled_from(DTYPES))
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


@pytest.mark.parametrize("count", [1, NESTED_BLOCKSIZE - 1, NESTED_BLOCKSIZE, NESTED_BLOCKSIZE + 1,
                                   70_000, 300_001])
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


def _poisoned(shape, dtype, device="cpu"):
    """A tensor of ``shape`` whose every byte is 0xAA."""
    size = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    return torch.full((size,), 0xAA, dtype=torch.uint8, device=device).view(dtype).reshape(shape)


ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                reason="needs a CUDA GPU and CUDA torch")]


@pytest.mark.parametrize("device, quant_type, n", [
    *[("cpu", "nf4", n) for n in (1, 63, 64, 65, 1001, 4096 * 3 + 17)],
    *[pytest.param("cuda", "fp4", n, marks=ON_CUDA) for n in (1, 63, 65, 4096 * 5 + 17)]])
def test_poisoned_outputs_fully_written(device, quant_type, n):
    """Each ``_out`` op writes every byte of its given outputs (they start as 0xAA): equal to the
    allocating op's result."""
    if device == "cuda":
        status = _kernels.available("cuda")
        assert status is True, f"CUDA kernels must build on a GPU machine: {status}"
    x = torch.randn(n, device=device)
    q = torch.ops.q4lab
    packed, absmax = q.quantize_4bit(x, 64, quant_type)
    p2, a2 = _poisoned(packed.shape, torch.uint8, device), _poisoned(absmax.shape, torch.float32,
                                                                     device)
    q.quantize_4bit_out(x, 64, quant_type, p2, a2)
    assert_bytes_equal(packed, p2, "packed")
    assert_bytes_equal(absmax, a2, "absmax")
    codes, absmax2, off = q.quantize_absmax(absmax, None)
    c3, m3, o3 = (_poisoned(codes.shape, torch.uint8, device),
                  _poisoned(absmax2.shape, torch.float32, device),
                  _poisoned((), torch.float32, device))
    q.quantize_absmax_out(absmax, None, c3, m3, o3)
    for e, g, what in [(codes, c3, "codes"), (absmax2, m3, "absmax2"), (off, o3, "offset")]:
        assert_bytes_equal(e, g, what)
    deq = q.dequantize_absmax(codes, absmax2, off)
    d4 = _poisoned(deq.shape, torch.float32, device)
    q.dequantize_absmax_out(codes, absmax2, off, d4)
    assert_bytes_equal(deq, d4, "dequantized absmax")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = q.dequantize_4bit(packed, absmax, 64, quant_type, n, dtype)
        o5 = _poisoned((n,), dtype, device)
        q.dequantize_4bit_out(packed, absmax, 64, quant_type, n, o5)
        assert_bytes_equal(out, o5, f"dequantized {dtype}")


# opcheck (schema, fake/meta kernel, autograd registration, dispatch) of every op and its _out
# form, on samples of ``sample_inputs``: the smallest one of each input dtype, the quant types
# taking turns. The cases are the product of these two lists, so adding an op or a sample adds its
# cases; test_opcheck_covers_every_op ties OPCHECK_OPS to the ops the extension really registers.
OPCHECK_OPS = tuple(name for op in _kernels.OPS for name in (op, op + "_out")) + (
    "quantize_absmax given offset",)
OPCHECK_SAMPLES = [min((s for s in sample_inputs() if s.dtype == dtype
                        and s.quant_type == BNB_QUANT_TYPES[i % len(BNB_QUANT_TYPES)]),
                       key=lambda s: s.x.size) for i, dtype in enumerate(DTYPES)]


def _opcheck_args(name: str, sample) -> tuple:
    q = torch.ops.q4lab
    x = torch.from_numpy(np.ascontiguousarray(sample.x, F32).reshape(-1)).to(TORCH[sample.dtype])
    bs, qt, n, dtype = sample.blocksize, sample.quant_type, sample.x.size, TORCH[sample.dtype]
    packed, absmax = q.quantize_4bit(x, bs, qt)
    codes, absmax2, off = q.quantize_absmax(absmax, None)
    e = torch.empty_like
    return {
        "quantize_4bit": (x, bs, qt),
        "quantize_4bit_out": (x, bs, qt, e(packed), e(absmax)),
        "quantize_absmax": (absmax, None),
        "quantize_absmax given offset": (absmax, torch.tensor(0.25)),
        "quantize_absmax_out": (absmax, None, e(codes), e(absmax2), e(off)),
        "dequantize_absmax": (codes, absmax2, off),
        "dequantize_absmax_out": (codes, absmax2, off, e(absmax)),
        "dequantize_4bit": (packed, absmax, bs, qt, n, dtype),
        "dequantize_4bit_out": (packed, absmax, bs, qt, n, torch.empty(n, dtype=dtype)),
    }[name]


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", OPCHECK_OPS)
def test_opcheck(name, sample):
    op = getattr(torch.ops.q4lab, name.split()[0]).default
    torch.library.opcheck(op, _opcheck_args(name, sample))


def test_opcheck_covers_every_op():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("q4lab::") and not n.startswith("q4lab::matmul")
                  and not n.startswith("q4lab::formats_")}  # tests/test_formats_kernels.py
    assert registered == {name.split()[0] for name in OPCHECK_OPS}, registered
    assert {s.dtype for s in OPCHECK_SAMPLES} == set(DTYPES)
    assert {s.quant_type for s in OPCHECK_SAMPLES} == set(BNB_QUANT_TYPES)


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
