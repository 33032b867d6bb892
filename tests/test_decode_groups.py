"""Sibling 4-bit layers decoded as one fused call (q4lab/decode_groups.py): every output byte equals
the layers' own calls, for any row count, dtype and bias; a changed input or weight is never served
from the group's kept outputs; the stacked layout is a droppable cache."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import q4lab
from q4lab import decode_groups
from q4lab import matmul as fused
from q4lab import ops
from q4lab.testing import assert_bytes_equal

needs_rows = pytest.mark.skipif(
    ops.kernel_status("cpu") is not True or fused.decode_form() is None,
    reason=f"C++ kernels or a form of the decode layout (AVX2 `rows`, AVX-512F `permute`) "
           f"unavailable: {ops.kernel_status('cpu')}")


class Block(nn.Module):
    """The shape of a Llama attention's and MLP's input projections (k/v narrower, one biased)."""

    def __init__(self, hidden=128, kv=32, inter=192, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, kv, bias=True)
        self.v_proj = nn.Linear(hidden, kv, bias=bias)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x),
                self.up_proj(x))


def quantized_block(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    block = Block(**kw)
    q4lab.quantize_model(block, q4lab.Q4Config(compute_dtype=dtype), progress=False)
    return block


def alone(block, x):
    """Each layer's own fused call (no group)."""
    return [fused.linear_forward(x.to(m.compute_dtype), *m._weight(),
                                 None if m.bias is None else m.bias.to(m.compute_dtype))
            .to(x.dtype) for m in (block.q_proj, block.k_proj, block.v_proj, block.gate_proj,
                                   block.up_proj)]


@needs_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
def test_grouped_outputs_are_the_lone_calls_bytes(dtype, rows):
    block = quantized_block(bias=rows == 3, dtype=dtype)
    assert decode_groups.link_siblings(block) == 0       # quantize_model linked them already
    assert decode_groups.group_of(block.q_proj) is decode_groups.group_of(block.v_proj)
    assert decode_groups.group_of(block.gate_proj) is decode_groups.group_of(block.up_proj)
    with torch.no_grad():
        for step in range(3):                             # the stacked layout appears at step 1
            x = torch.randn(1, rows, 128).to(dtype)
            got = block(x)
            for name, g, e in zip(("q", "k", "v", "gate", "up"), got, alone(block, x)):
                assert g.shape == e.shape and g.is_contiguous()
                assert_bytes_equal(e, g, f"{name} step {step} {dtype} rows={rows}")
    assert fused.decode_cache_bytes(block) > 0


@needs_rows
def test_a_changed_input_or_weight_is_never_served_from_the_group():
    block = quantized_block(seed=1)
    with torch.no_grad():
        x = torch.randn(1, 1, 128)
        block(x), block(x)                                # the stacked layout is built
        block.q_proj(x)                                   # k, v outputs are now kept for x
        x.mul_(2.0)                                       # ... but x changes in place
        assert_bytes_equal(alone(block, x)[1], block.k_proj(x), "k after x changed in place")
        other = torch.randn(1, 1, 128)
        block.q_proj(x)
        assert_bytes_equal(alone(block, other)[2], block.v_proj(other), "v of another input")
        donor = quantized_block(seed=2)
        block.k_proj.packed.copy_(donor.k_proj.packed)    # a weight written in place
        block.k_proj.quant_stats.copy_(donor.k_proj.quant_stats)
        block.k_proj.bias.copy_(donor.k_proj.bias)
        for _ in range(2):
            got = block(x)
            assert_bytes_equal(alone(block, x)[1], got[1], "k after its weight changed")
            assert_bytes_equal(alone(donor, x)[1], got[1], "k equals the donor's")


@needs_rows
def test_drop_unlink_and_training_leave_every_layer_alone():
    block = quantized_block(seed=3)
    x = torch.randn(2, 128)
    with torch.no_grad():
        block(x), block(x)
        assert fused.drop_decode_cache(block) > 0 and fused.decode_cache_bytes(block) == 0
        assert decode_groups.unlink_siblings(block) == 2
        assert decode_groups.group_of(block.q_proj) is None
        for g, e in zip(block(x), alone(block, x)):
            assert_bytes_equal(e, g, "unlinked")
    decode_groups.link_siblings(block)
    x.requires_grad_(True)
    q = block.q_proj(x)                                   # autograd on: dequantize path, no group
    assert q.requires_grad and not decode_groups.group_of(block.q_proj).kept


def test_layers_that_differ_are_not_grouped():
    torch.manual_seed(4)
    block = Block()
    block.v_proj = nn.Linear(128, 32)
    q4lab.quantize_model(block, q4lab.Q4Config(), progress=False)
    block.v_proj = q4lab.Linear4bit.from_linear(nn.Linear(128, 32), blocksize=128)
    decode_groups.unlink_siblings(block)
    assert decode_groups.link_siblings(block) == 1        # gate/up only: v has another blocksize
    assert decode_groups.group_of(block.q_proj) is None
