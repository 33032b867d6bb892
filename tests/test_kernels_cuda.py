"""CUDA kernels (``csrc/q4_cuda.cu``) == C++ kernels == NumPy reference, byte for byte.

Needs a CUDA GPU and a CUDA build of torch; skipped cleanly otherwise (the CI machines have none:
there ``tests/test_cuda_compile.py`` only compiles the source). On a GPU machine run
``pytest tests/test_kernels_cuda.py``; the >2^31-element test (marked ``slow``) needs about 10 GB of
free GPU memory and skips itself with a message when there is less. The test that every ``_out``
op writes all its bytes runs on both devices in tests/test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

import q4lab
from q4lab import _kernels, ops
from q4lab.testing import assert_bytes_equal, assert_parity, sample_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and CUDA torch"),
]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert _kernels.available("cpu") is True
    status = _kernels.available("cuda")
    assert status is True, f"CUDA kernels must build on a GPU machine: {status}"


@pytest.mark.parametrize("sample", sample_inputs(), ids=lambda s: s.name)
def test_reference_cpu_cuda_identical(sample):
    """Both kernels against the reference (``q4lab.testing.parity_mismatches``: every output
    byte, the dequantized values in all three dtypes); equal to it, they equal each other."""
    args = (sample.x, sample.dtype, sample.blocksize, sample.quant_type, sample.double_quant)
    for backend in ("cpu", "cuda"):
        assert_parity(*args, backend=backend, what=f"{backend} {sample!r}")


def test_auto_picks_cuda_for_cuda_tensors():
    assert ops.resolve_backend("auto", torch.device("cuda")) == "cuda"
    packed, state = q4lab.quantize_4bit(torch.randn(1000, device="cuda"))
    assert packed.is_cuda and state.absmax.is_cuda


def test_offset_given_on_cuda():
    w = torch.randn(64 * 700)
    off = 0.0123
    p_cpu, s_cpu = q4lab.quantize_4bit(w, backend="cpu", offset=off)
    p_gpu, s_gpu = q4lab.quantize_4bit(w.cuda(), backend="cuda", offset=off)
    assert_bytes_equal(s_cpu.absmax, s_gpu.absmax, "codes")
    assert_bytes_equal(s_cpu.state2.absmax, s_gpu.state2.absmax, "absmax2")


def test_non_finite_names_block_on_cuda():
    w = torch.randn(64 * 9, device="cuda")
    w[64 * 4 + 2] = float("nan")
    with pytest.raises(ValueError, match=r"block 4"):
        q4lab.quantize_4bit(w, backend="cuda")


def test_opcheck_cuda():
    x = torch.randn(64 * 5 + 3, device="cuda")
    packed, absmax = torch.ops.q4lab.quantize_4bit(x, 64, "nf4")
    codes, absmax2, off = torch.ops.q4lab.quantize_absmax(absmax, None)
    torch.library.opcheck(torch.ops.q4lab.quantize_4bit.default, (x.half(), 64, "nf4"))
    torch.library.opcheck(torch.ops.q4lab.quantize_absmax.default, (absmax, None))
    torch.library.opcheck(torch.ops.q4lab.dequantize_absmax.default, (codes, absmax2, off))
    torch.library.opcheck(torch.ops.q4lab.dequantize_4bit.default,
                          (packed, absmax, 64, "nf4", x.numel(), torch.float16))


@pytest.mark.slow
def test_more_than_2_31_elements():
    """64-bit indexing: n = 2^31 + 4099 bf16 elements (4 GiB in, 1 GiB packed, 4 GiB out). The last
    blocks, where 32-bit indices would have wrapped, are compared with the C++ kernel."""
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2**30:
        pytest.skip(f"needs ~10 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    n = 2**31 + 4099
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    packed, absmax = _kernels.quantize_4bit(w, 64, "nf4")
    lo = (n - 64 * 1000) // 64 * 64  # whole blocks from here to the end
    piece = w[lo:].cpu()
    p_cpu, a_cpu = _kernels.quantize_4bit(piece, 64, "nf4")
    assert_bytes_equal(p_cpu, packed[lo // 2:], "packed tail")
    assert_bytes_equal(a_cpu, absmax[lo // 64:], "absmax tail")
    codes, absmax2, off = _kernels.quantize_absmax(absmax)
    c_cpu, m_cpu, o_cpu = _kernels.quantize_absmax(absmax.cpu())
    assert_bytes_equal(o_cpu, off, "offset")
    assert_bytes_equal(c_cpu, codes, "nested codes")
    assert_bytes_equal(m_cpu, absmax2, "absmax2")
    del w
    out = _kernels.dequantize_4bit(packed, absmax, 64, "nf4", n, torch.bfloat16)
    want = _kernels.dequantize_4bit(p_cpu, a_cpu, 64, "nf4", n - lo, torch.bfloat16)
    assert_bytes_equal(want, out[lo:], "dequantized tail")
