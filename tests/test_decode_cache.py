"""The decode layout cache of ``q4lab.matmul.decode_args`` (module docstring of q4lab/matmul.py):
built lazily at the second decode call on the same packed tensor, never for a tensor that is new
each forward (an FSDP all-gather) or a tensor subclass (DTensor), dropped on demand, rebuilt after
an in-place write; the decode layout (``repack_rows``) gives the stored layout's bytes.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import q4lab
from q4lab import matmul as fused
from q4lab import ops
from q4lab.nn import Linear4bit
from q4lab.testing import assert_bytes_equal

needs_cpu_kernels = pytest.mark.skipif(
    ops.kernel_status("cpu") is not True or fused.decode_form() is None,
    reason=f"C++ kernels or a form of the decode layout (AVX2 `rows`, AVX-512F `permute`) "
           f"unavailable: {ops.kernel_status('cpu')}")


def layer(n=48, k=256, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(torch.nn.Linear(k, n))


@needs_cpu_kernels
def test_the_copy_is_built_at_the_second_call_and_gives_the_same_bytes():
    lin, x = layer(), torch.randn(1, 256)
    with torch.no_grad():
        first = lin(x)
        assert fused.decode_cache_bytes(lin) == 0          # one call: nothing kept
        second = lin(x)
        assert fused.decode_cache_bytes(lin) == cache_size(48, 256)
        third = lin(x)
    expected = q4lab.matmul_4bit(x, lin.packed, lin.quant_state, lin.bias)
    for name, y in (("first", first), ("second", second), ("third", third)):
        assert_bytes_equal(expected, y, f"{name} call")
    codes, absmax = fused.repack_rows(lin.packed, lin.quant_state)
    assert codes.shape == (256 // 64, 2, 32, 32) and absmax.shape == (256 // 64, 64)
    # position p of group g holds row 32g + ROW_OF_POSITION[p]; rows past N are zero bytes
    rows = torch.tensor([32 * g + fused.ROW_OF_POSITION[p] for g in range(2) for p in range(32)])
    by_row = codes.permute(1, 3, 0, 2).reshape(64, 256 // 2)   # (G*32 positions, K/2)
    stored = lin.packed.reshape(48, 128)
    for i, row in enumerate(rows.tolist()):
        expected = stored[row] if row < 48 else torch.zeros(128, dtype=torch.uint8)
        assert torch.equal(by_row[i], expected), f"position {i} (row {row})"
    decoded = torch.ops.q4lab.dequantize_absmax(lin.quant_state.absmax,
                                                lin.quant_state.state2.absmax,
                                                lin.quant_state.offset.reshape(()).float())
    assert torch.equal(absmax[:, :48], decoded.reshape(48, 4).t())
    assert not absmax[:, 48:].any()


def cache_size(n: int, k: int, blocksize: int = 64) -> int:
    """Bytes of the decode layout: codes (K/B, G, B/2, 32) and float32 absmax (K/B, 32G)."""
    groups = -(-n // 32)
    return (k // blocksize) * groups * 32 * (blocksize // 2 + 4)


@needs_cpu_kernels
def test_a_new_packed_tensor_each_forward_never_gets_a_copy_nor_is_kept_alive():
    """FSDP all-gathers the weight into a new tensor each forward: no full-size copy may stay."""
    lin, x = layer(), torch.randn(1, 256)
    stored = lin.packed
    refs = []
    with torch.no_grad():
        for _ in range(4):
            # what an all-gather hands the layer: a new parameter each forward
            lin.packed = torch.nn.Parameter(stored.clone(), requires_grad=False)
            refs.append(weakref.ref(lin.packed))
            lin(x)
            assert fused.decode_cache_bytes(lin) == 0
    lin.packed = stored
    with torch.no_grad():
        lin(x)  # Linear4bit._weight's views follow the registered parameter at the next call
    gc.collect()
    assert all(r() is None for r in refs), "the decode cache kept a gathered weight alive"


@needs_cpu_kernels
def test_a_tensor_subclass_is_never_repacked():
    """Linear4bit itself refuses a sharded (DTensor) weight outside FSDP's gather; decode_args,
    handed any tensor subclass, never builds a copy of it either."""
    class Sharded(torch.Tensor):  # stands for DTensor
        pass

    lin = layer()
    packed, state = lin._weight()
    sharded = packed.detach().as_subclass(Sharded)
    for _ in range(3):
        args = fused.decode_args(lin, sharded, state)
    assert args[0] is not None and args[0].dim() == 1
    assert fused.decode_cache_bytes(lin) == 0


@needs_cpu_kernels
def test_drop_set_repack_and_in_place_writes():
    lin, other, x = layer(seed=0), layer(seed=1), torch.randn(1, 256)
    with torch.no_grad():
        lin(x), lin(x)
        assert fused.drop_decode_cache(lin) == cache_size(48, 256)
        assert fused.decode_cache_bytes(lin) == 0
        fused.set_repack(False)
        try:
            lin(x), lin(x), lin(x)
            assert fused.decode_cache_bytes(lin) == 0
        finally:
            fused.set_repack(True)
        lin(x), lin(x)
        assert fused.decode_cache_bytes(lin) > 0
        lin.packed.copy_(other.packed)  # in place: the cached copy is stale and must go
        lin.quant_state.absmax.copy_(other.quant_state.absmax)
        lin.quant_state.state2.absmax.copy_(other.quant_state.state2.absmax)
        lin.quant_state.offset.copy_(other.quant_state.offset)
        expected = q4lab.matmul_4bit(x, other.packed, other.quant_state, lin.bias)
        for call in range(3):
            assert_bytes_equal(expected, lin(x), f"after the in-place write, call {call}")


@needs_cpu_kernels
def test_no_copy_when_blocks_straddle_rows():
    torch.manual_seed(2)
    lin, x = Linear4bit.from_linear(torch.nn.Linear(96, 40)), torch.randn(1, 96)  # 96 % 64 != 0
    with torch.no_grad():
        ys = [lin(x) for _ in range(3)]
    assert fused.decode_cache_bytes(lin) == 0
    for y in ys:
        assert_bytes_equal(q4lab.matmul_4bit(x, lin.packed, lin.quant_state, lin.bias), y)


@needs_cpu_kernels
def test_a_decode_layout_of_the_wrong_shape_or_form_is_refused():
    lin = layer()
    codes, absmax = fused.repack_rows(lin.packed, lin.quant_state)
    tail = fused.kernel_args(lin.packed, lin.quant_state)[4:]
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="decode-layout packed has shape"):
        torch.ops.q4lab.matmul_4bit(x, codes.reshape(2, 4, 32, 32), absmax, None, None, *tail,
                                    None, "auto")
    with pytest.raises(RuntimeError, match="absmax must be decoded float32"):
        torch.ops.q4lab.matmul_4bit(x, codes, absmax[:, :48].contiguous(), None, None, *tail,
                                    None, "auto")
    with pytest.raises(RuntimeError, match="read by the 'rows' and 'permute' forms only"):
        torch.ops.q4lab.matmul_4bit(x, codes, absmax, None, None, *tail, None, "table")
    with pytest.raises(ValueError, match="in_features % blocksize"):
        fused.repack_rows(*q4lab.quantize_4bit(torch.randn(4, 96), 64))
