"""The fused ``matmul_4bit``: the NumPy spec against a literal reading of its steps, and the C++
kernels (every compiled ISA, 1 and 2 threads) against the spec, byte for byte (docs/format.md,
"Fused matmul"; q4lab/reference/matmul.py).

Style of llm.c's ``dev/cuda`` (validate every kernel version against the reference before timing
it: timing lives in bench/bench_infer.py) and pytorch/extension-cpp (sample inputs + opcheck).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import q4lab
from q4lab import matmul as fused
from q4lab import _build, ops
from q4lab import reference as ref
from q4lab.constants import BLOCKSIZES, QUANT_TYPES
from q4lab.nn import Linear4bit
from q4lab.testing import assert_bytes_equal, byte_mismatch

F32 = np.float32
needs_cpu_kernels = pytest.mark.skipif(
    ops.kernel_status("cpu") is not True,
    reason=f"C++ kernels unavailable: {ops.kernel_status('cpu')}")


def literal_matmul(x: np.ndarray, packed, state, bias=None) -> np.ndarray:
    """Steps 1-6 of reference/matmul.py (order pair-chain-v2) read literally: scalar loops, one
    np.float32 op each."""
    n_rows, k = state.shape
    table = ref.codebook(state.quant_type)
    absmax = ref.state_absmax(state)
    codes = ref.api.unpack_nibbles(packed, n_rows * k)
    out = np.zeros((x.shape[0], n_rows), dtype=F32)
    for m in range(x.shape[0]):
        def product(f, o, m=m):
            return F32(table[codes[f]] * F32(x[m, f - o * k]))
        for o in range(n_rows):
            acc = F32(0.0)
            e = o * k
            while e < (o + 1) * k:
                b = e // state.blocksize
                end = min((o + 1) * k, (b + 1) * state.blocksize)
                s = F32(0.0)
                f = e
                while f < end:
                    if f % 2 == 0 and f + 1 < end:   # both elements of byte f // 2 in the segment
                        s = F32(s + F32(product(f, o) + product(f + 1, o)))
                        f += 2
                    else:
                        s = F32(s + product(f, o))
                        f += 1
                acc = F32(acc + F32(absmax[b] * s))
                e = end
            out[m, o] = acc if bias is None else F32(acc + F32(bias[o]))
    return out


# Shapes that exercise every segment case: blocks inside rows, blocks straddling rows
# (K % B != 0), blocks longer than rows, odd K, K = 1, K % 32 != 0, one row.
SHAPES = [(3, 64, 64), (5, 100, 64), (4, 7, 32), (3, 96, 64), (2, 33, 128), (6, 32, 64),
          (4, 160, 32), (1, 1, 32), (7, 5, 4096), (2, 300, 256), (9, 64, 32)]


@pytest.mark.parametrize("n,k,blocksize", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int4", True)])
def test_reference_equals_its_literal_reading(n, k, blocksize, quant_type, double_quant):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k)).astype(F32)
    w[0, : min(k, 3)] = 0.0  # zeros, and an all-zero block when the row is short
    packed, state = ref.quantize_4bit(w, blocksize, quant_type, double_quant)
    x = rng.standard_normal((2, k)).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    assert_bytes_equal(literal_matmul(x, packed, state, bias),
                       ref.matmul_4bit(x, packed, state, bias),
                       f"({n}, {k}) bs={blocksize} {quant_type}")


def test_reference_is_close_to_the_dequantized_product():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 320)).astype(F32)
    packed, state = ref.quantize_4bit(w, 64)
    x = rng.standard_normal((3, 320)).astype(F32)
    y = ref.matmul_4bit(x, packed, state).astype(np.float64)
    exact = x.astype(np.float64) @ ref.dequantize_4bit(packed, state).astype(np.float64).T
    assert np.abs(y - exact).max() <= 1e-5 * np.abs(exact).max()
    assert byte_mismatch(y.astype(F32), exact.astype(F32)) is not None  # another order, other bytes


# ---- kernels against the spec --------------------------------------------------------------------
def matmul_cases(seed: int = 0):
    """(name, x, packed, state, bias) on torch tensors: every quant type, nested or not, every
    input dtype, bias or not, several rows, every shape of SHAPES plus real layer shapes."""
    rng = torch.Generator().manual_seed(seed)
    cases = []
    # (141, 4096, 64): enough weights that the table form really runs on 2 threads (>= 2^18 each)
    shapes = SHAPES + [(64, 576, 64), (40, 1536, 128), (33, 4096, 4096), (141, 4096, 64)]
    for i, (n, k, bs) in enumerate(shapes):
        qt = QUANT_TYPES[i % 3]
        for dq in (True, False):
            w = torch.randn(n, k, generator=rng)
            if i % 4 == 0:
                w[:, : k // 2] = 0.0  # all-zero blocks beside ordinary ones
            packed, state = q4lab.quantize_4bit(w, bs, qt, dq)
            for j, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
                rows = (1, 3, 8)[(i + j) % 3]
                x = torch.randn(rows, k, generator=rng).to(dtype)
                bias = torch.randn(n, generator=rng).to(dtype) if (i + j) % 2 else None
                cases.append((f"({n},{k}) bs{bs} {qt} dq={dq} {dtype} rows={rows}", x, packed,
                              state, bias))
    return cases


CASES = matmul_cases()


@needs_cpu_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_every_isa_matches_the_reference_at_any_thread_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, x, packed, state, bias in CASES:
            expected = fused.matmul_4bit(x, packed, state, bias, backend="reference")
            for isa in fused.isas():
                got = fused._kernel(x, packed, state, bias, isa)
                assert got.dtype == x.dtype
                assert_bytes_equal(expected, got, f"{name} isa={isa} threads={threads}")
            if state.shape[1] % state.blocksize == 0:
                for form in _layout_forms():  # the decode layout
                    assert_bytes_equal(expected, _rows_kernel(x, packed, state, bias, form),
                                       f"{name} {form} on the decode layout threads={threads}")
    finally:
        torch.set_num_threads(before)


def _layout_forms():
    """The forms compiled here that read the decode layout ('permute' everywhere, 'rows' with
    AVX2)."""
    return [f for f in fused.isas() if f in fused.DECODE_LAYOUT_FORMS]


def _rows_kernel(x, packed, state, bias, form="rows"):
    """A form on the decode layout (q4lab.matmul.repack_rows) instead of the stored bytes; the
    bias in x's dtype, as Linear4bit passes it."""
    args = fused.repack_rows(packed, state) + (None, None) + fused.kernel_args(packed, state)[4:]
    y = torch.ops.q4lab.matmul_4bit(x.reshape(-1, x.shape[-1]), *args, bias, form)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@needs_cpu_kernels
def test_isas_are_listed_and_a_bad_isa_is_refused():
    isas = fused.isas()
    assert isas[0] == "portable" and "table" in isas and "permute" in isas
    assert set(isas) <= {"portable", "table", "rows", "permute"}
    # 'auto' (the last) is never the permute form lowered lane by lane
    flags = _build.cpu_flags()  # the kernels are built with -march=native
    assert isas[-1] == ("permute" if "avx512f" in flags else "rows" if "avx2" in flags else "table")
    assert fused.decode_form() == (isas[-1] if isas[-1] in fused.DECODE_LAYOUT_FORMS else None)
    name, x, packed, state, bias = CASES[0]
    with pytest.raises(RuntimeError, match="isa='sse9' is not available"):
        fused._kernel(x, packed, state, bias, "sse9")


@needs_cpu_kernels
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), k=st.integers(1, 300), blocksize=st.sampled_from(BLOCKSIZES[:5]),
       quant_type=st.sampled_from(QUANT_TYPES), double_quant=st.booleans(), rows=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_match_reference_hypothesis(n, k, blocksize, quant_type, double_quant, rows, dtype,
                                            with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(1, generator=g) * 10
    packed, state = q4lab.quantize_4bit(w, blocksize, quant_type, double_quant)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    expected = fused.matmul_4bit(x, packed, state, bias, backend="reference")
    assert expected.shape == (rows, n)
    for isa in fused.isas():
        assert_bytes_equal(expected, fused._kernel(x, packed, state, bias, isa), f"isa={isa}")
    if k % blocksize == 0:
        for form in _layout_forms():
            assert_bytes_equal(expected, _rows_kernel(x, packed, state, bias, form),
                               f"{form} on the decode layout")


@needs_cpu_kernels
def test_out_form_writes_every_byte_of_a_poisoned_buffer():
    for name, x, packed, state, bias in CASES[::5]:
        expected = fused.matmul_4bit(x, packed, state, bias, backend="reference")
        for isa in fused.isas():
            out = torch.full_like(expected, float("nan"))
            s2 = state.state2.absmax if state.nested else None
            off = state.offset.reshape(()).float() if state.nested else None
            torch.ops.q4lab.matmul_4bit_out(x, packed, state.absmax, s2, off, state.blocksize,
                                            state.quant_type, state.shape[0],
                                            None if bias is None else bias.float(), isa, out)
            assert_bytes_equal(expected, out, f"{name} isa={isa} (poisoned out)")


@needs_cpu_kernels
def test_opcheck():
    fused.register_fake()
    for _name, x, packed, state, bias in CASES[:: max(1, len(CASES) // 6)]:
        s2 = state.state2.absmax if state.nested else None
        off = state.offset.reshape(()).float() if state.nested else None
        args = (x, packed, state.absmax, s2, off, state.blocksize, state.quant_type,
                state.shape[0], None if bias is None else bias.float(), "auto")
        torch.library.opcheck(torch.ops.q4lab.matmul_4bit.default, args)


# ---- the front end: shapes, errors, gradients, Linear4bit ----------------------------------------
@needs_cpu_kernels
def test_leading_dims_and_output_dtype():
    w = torch.randn(24, 96)
    packed, state = q4lab.quantize_4bit(w)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y = q4lab.matmul_4bit(x, packed, state)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    flat = q4lab.matmul_4bit(x.reshape(6, 96), packed, state)
    assert_bytes_equal(flat.reshape(2, 3, 24), y)


def test_bad_inputs_get_clear_errors():
    w = torch.randn(16, 64)
    packed, state = q4lab.quantize_4bit(w, backend="reference")
    with pytest.raises(ValueError, match="last dimension must be 64"):
        q4lab.matmul_4bit(torch.randn(2, 63), packed, state)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        q4lab.matmul_4bit(torch.ones(2, 64, dtype=torch.int64), packed, state)
    with pytest.raises(ValueError, match="not contiguous"):
        q4lab.matmul_4bit(torch.randn(64, 2).t(), packed, state)
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        q4lab.matmul_4bit(torch.randn(2, 64, device="meta"), packed, state)
    with pytest.raises(ValueError, match="bias has shape"):
        q4lab.matmul_4bit(torch.randn(2, 64), packed, state, bias=torch.randn(15))
    flat_packed, flat_state = q4lab.quantize_4bit(torch.randn(64), backend="reference")
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        q4lab.matmul_4bit(torch.randn(2, 64), flat_packed, flat_state)
    with pytest.raises((ValueError, TypeError)):
        q4lab.matmul_4bit(torch.randn(2, 64), packed[:-1], state)  # truncated packed data
    with pytest.raises(ValueError, match="backend"):
        q4lab.matmul_4bit(torch.randn(2, 64), packed, state, backend="tpu")


@needs_cpu_kernels
def test_op_checks_guard_direct_calls():
    packed, state = q4lab.quantize_4bit(torch.randn(8, 64), double_quant=False)
    op = torch.ops.q4lab.matmul_4bit
    with pytest.raises(RuntimeError, match="packed has 256 bytes but a \\(8, 63\\) weight"):
        op(torch.randn(1, 63), packed, state.absmax, None, None, 64, "nf4", 8, None)
    with pytest.raises(RuntimeError, match="contiguous \\(..., K\\) tensor"):
        op(torch.randn(64, 2).t(), packed, state.absmax, None, None, 64, "nf4", 8, None)
    with pytest.raises(RuntimeError, match="contiguous \\(..., K\\) tensor"):
        op(torch.tensor(1.0), packed, state.absmax, None, None, 64, "nf4", 8, None)
    # any leading shape: (..., K) -> (..., N), the same bytes as the rows one by one
    x = torch.randn(2, 3, 64)
    y = op(x, packed, state.absmax, None, None, 64, "nf4", 8, None)
    assert y.shape == (2, 3, 8)
    assert_bytes_equal(op(x.reshape(6, 64), packed, state.absmax, None, None, 64, "nf4", 8,
                          None).reshape(2, 3, 8), y, "(2, 3, K) input")
    assert op(torch.randn(64), packed, state.absmax, None, None, 64, "nf4", 8, None).shape == (8,)
    with pytest.raises(RuntimeError, match="blocksize=48"):
        op(torch.randn(1, 64), packed, state.absmax, None, None, 48, "nf4", 8, None)
    with pytest.raises(RuntimeError, match="offset given without absmax2"):
        op(torch.randn(1, 64), packed, state.absmax, None, torch.tensor(0.0), 64, "nf4", 8, None)


@needs_cpu_kernels
def test_gradient_is_the_dequantized_weight_product():
    w = torch.randn(32, 128)
    packed, state = q4lab.quantize_4bit(w)
    x = torch.randn(3, 128, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    y = q4lab.matmul_4bit(x, packed, state, bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    w_hat = q4lab.dequantize_4bit(packed, state, torch.float32)
    assert_bytes_equal(grad @ w_hat, x.grad, "dL/dx")
    assert_bytes_equal(grad.sum(0), bias.grad, "dL/dbias")


@needs_cpu_kernels
def test_linear4bit_decodes_with_the_fused_kernel_and_never_dequantizes(monkeypatch):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(256, 48), compute_dtype=torch.bfloat16)
    x1 = torch.randn(1, 1, 256)
    expected = q4lab.matmul_4bit(x1.to(torch.bfloat16), layer.packed, layer.quant_state,
                                 layer.bias.to(torch.bfloat16)).float()

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the fused path dequantized the weight")

    monkeypatch.setattr(ops, "dequantize_4bit", no_dequantize)
    with torch.no_grad():  # decoding (generate runs without autograd)
        assert layer.uses_fused(x1)
        assert_bytes_equal(expected, layer(x1), "Linear4bit one-row forward")
        many = torch.randn(4, 16, 256)
        assert not layer.uses_fused(many)  # 64 rows: dequantize once + F.linear
        with pytest.raises(AssertionError, match="dequantized"):
            layer(many)
    assert not layer.uses_fused(x1)  # autograd on (training): the dequantize path, as always
    monkeypatch.undo()
    layer.matmul_path = "fused"
    assert layer.uses_fused(many)
    assert_bytes_equal(q4lab.matmul_4bit(many.to(torch.bfloat16), layer.packed, layer.quant_state,
                                         layer.bias.to(torch.bfloat16)).float(), layer(many))
    layer.matmul_path = "sideways"
    with pytest.raises(ValueError, match="matmul_path='sideways'"):
        layer(x1)


@needs_cpu_kernels
def test_linear4bit_fused_path_follows_a_new_weight():
    """The layer caches the kernel's weight arguments; a weight copied into its tensors in place, or
    a packed tensor and state replaced by assignment, must be what it then computes."""
    torch.manual_seed(1)
    a, b = (Linear4bit.from_linear(torch.nn.Linear(128, 40, bias=False)) for _ in range(2))
    c = Linear4bit.from_linear(torch.nn.Linear(128, 40, bias=False), double_quant=False)
    x = torch.randn(1, 128)
    with torch.no_grad():
        for step, source in (("as built", a), ("copied in place", b), ("assigned", c)):
            if step == "copied in place":
                for mine, theirs in ((a.packed, b.packed),
                                     (a.quant_state.absmax, b.quant_state.absmax),
                                     (a.quant_state.state2.absmax, b.quant_state.state2.absmax),
                                     (a.quant_state.offset, b.quant_state.offset)):
                    mine.copy_(theirs)
            elif step == "assigned":
                a.packed, a.quant_state = c.packed, c.quant_state
            assert a.uses_fused(x)
            expected = q4lab.matmul_4bit(x, source.packed, source.quant_state)
            for call in ("first call", "second call (decode layout cached)"):
                assert_bytes_equal(expected, a(x), f"Linear4bit's weight {step}, {call}")


# ---- CUDA: compiled by tests/test_cuda_compile.py (no GPU in CI), run where a GPU is ----------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernel_matches_the_reference():
    for name, x, packed, state, bias in CASES:
        expected = fused.matmul_4bit(x, packed, state, bias, backend="reference")
        got = q4lab.matmul_4bit(x.cuda(), packed.cuda(), state.to("cuda"),
                                None if bias is None else bias.cuda(), backend="cuda")
        assert_bytes_equal(expected, got.cpu(), f"{name} cuda")
