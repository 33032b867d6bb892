"""The decode layout cache of ``q4lab.matmul.decode_args`` (module docstring of q4lab/matmul.py):
built lazily at the second decode call on the same packed tensor, never for a tensor that is new
each forward (an FSDP all-gather) or a tensor subclass (DTensor), dropped on demand, rebuilt after
an in-place write; the blocked layout gives the stored layout's bytes (every kernel form).
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
    ops.kernel_status("cpu") is not True,
    reason=f"C++ kernels unavailable: {ops.kernel_status('cpu')}")


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
        assert fused.decode_cache_bytes(lin) == lin.packed.numel()
        third = lin(x)
    expected = q4lab.matmul_4bit(x, lin.packed, lin.quant_state, lin.bias)
    for name, y in (("first", first), ("second", second), ("third", third)):
        assert_bytes_equal(expected, y, f"{name} call")
    blocked = fused.repack_blocks(lin.packed, lin.quant_state)
    assert blocked.shape == (256 // 64, 48, 32)
    assert torch.equal(blocked.transpose(0, 1).reshape(-1), lin.packed.reshape(-1))


@needs_cpu_kernels
def test_a_new_packed_tensor_each_forward_never_gets_a_copy_nor_is_kept_alive():
    """FSDP all-gathers the weight into a new tensor each forward: no full-size copy may stay."""
    lin, x = layer(), torch.randn(1, 256)
    stored = lin.packed
    refs = []
    with torch.no_grad():
        for _ in range(4):
            lin.packed = stored.clone()  # what an all-gather hands the layer
            refs.append(weakref.ref(lin.packed))
            lin(x)
            assert fused.decode_cache_bytes(lin) == 0
    lin.packed = stored
    gc.collect()
    assert all(r() is None for r in refs), "the decode cache kept a gathered weight alive"


@needs_cpu_kernels
def test_a_tensor_subclass_is_never_repacked():
    class Sharded(torch.Tensor):  # stands for DTensor: any subclass is left alone
        pass

    lin, x = layer(), torch.randn(1, 256)
    lin.packed = lin.packed.as_subclass(Sharded)
    with torch.no_grad():
        for _ in range(3):
            lin(x)
    assert fused.decode_cache_bytes(lin) == 0


@needs_cpu_kernels
def test_drop_set_repack_and_in_place_writes():
    lin, other, x = layer(seed=0), layer(seed=1), torch.randn(1, 256)
    with torch.no_grad():
        lin(x), lin(x)
        assert fused.drop_decode_cache(lin) == lin.packed.numel()
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
def test_a_blocked_tensor_of_the_wrong_shape_is_refused():
    lin = layer()
    args = fused.kernel_args(lin.packed, lin.quant_state)
    wrong = fused.repack_blocks(lin.packed, lin.quant_state).reshape(8, 24, 32)
    with pytest.raises(RuntimeError, match="blocked packed has shape"):
        torch.ops.q4lab.matmul_4bit(torch.randn(1, 256), wrong, *args[1:], None, "auto")
    with pytest.raises(ValueError, match="in_features % blocksize"):
        fused.repack_blocks(*q4lab.quantize_4bit(torch.randn(4, 96), 64))
