"""How a ``Linear4bit`` stores its bytes so that PyTorch FSDP2 can shard them (docs/distributed.md).

Two frozen 1-D parameters hold everything a 4-bit layer owns:

- ``packed``: the packed codes, ceil(n/2) bytes, in a *storage dtype* (``quant_storage``): uint8 by
  default, or the same bytes viewed as bf16/fp16/fp32/... (bitsandbytes' ``bnb_4bit_quant_storage``,
  ``functional.py::quantize_4bit(quant_storage=...)``), zero-padded to a whole number of elements.
- ``quant_stats``: uint8, the statistics as raw bytes. Plain state: ``absmax`` (float32 per block).
  Double-quantized: ``nested_absmax`` (float32 per 256 blocks) | ``offset`` (float32) | ``absmax``
  (uint8 codes per block). Float parts come first, so their byte offsets are multiples of 4 and
  ``view(torch.float32)`` of a slice is legal.

Statistics are bytes because FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` casts every
floating-point parameter (``_fsdp_param.py::init_dtype_attrs`` skips only non-float ones): a float32
absmax would arrive as bf16. The codebooks (16 and 256 float32 values) are shared constants, kept
beside the parameters, never sharded. The functions here are pure: bytes in, views out.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .constants import NESTED_BLOCKSIZE
from .state import QuantState

FLOAT32 = torch.float32


def storage_dtype(value) -> torch.dtype:
    """``value`` (a torch dtype or its name) as a dtype a packed 4-bit tensor may be stored in."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if not isinstance(value, torch.dtype) or value.is_complex or value == torch.bool:
        raise TypeError(f"quant_storage={value!r} is not a storage dtype; use torch.uint8 (the "
                        f"default) or a dtype to view the bytes as, e.g. torch.bfloat16")
    return value


def storage_numel(nbytes: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold ``nbytes`` bytes (the last one zero-padded)."""
    size = torch.empty((), dtype=dtype).element_size()
    return -(-nbytes // size)


def to_storage(packed_bytes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1-D uint8 codes -> a 1-D tensor of ``dtype`` holding them (a view when no padding is
    needed, else a zero-padded copy)."""
    flat = packed_bytes.reshape(-1)
    if dtype == torch.uint8:
        return flat
    size = torch.empty((), dtype=dtype).element_size()
    pad = -flat.numel() % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.contiguous().view(dtype)


def as_bytes(packed: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` bytes of a stored ``packed`` tensor, as a 1-D uint8 view."""
    if packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() == nbytes:
        return packed
    return packed.reshape(-1).view(torch.uint8)[:nbytes]


def stats_to_bytes(state: QuantState) -> torch.Tensor:
    """The statistics of a torch ``state`` as one 1-D uint8 tensor (layout in the docstring)."""
    absmax = state.absmax.reshape(-1)
    if not state.nested:
        return absmax.to(FLOAT32).contiguous().view(torch.uint8).clone()
    nested = state.state2.absmax.reshape(-1).to(FLOAT32)
    offset = torch.as_tensor(state.offset, dtype=FLOAT32, device=absmax.device).reshape(1)
    return torch.cat([nested.view(torch.uint8), offset.view(torch.uint8), absmax.contiguous()])


def template_of(state: QuantState) -> QuantState:
    """``state`` without its per-layer tensors (shape, dtype, blocksize, type, codebooks)."""
    state2 = None if state.state2 is None else replace(state.state2, absmax=None)
    return replace(state, absmax=None, offset=None, state2=state2)


def state_from_bytes(template: QuantState, stats: torch.Tensor) -> QuantState:
    """A QuantState whose absmax / offset / nested absmax are views of ``stats`` (so in-place
    changes of either are seen by the other)."""
    if not template.nested:
        return replace(template, absmax=stats.view(FLOAT32))
    groups = -(-template.nblocks // NESTED_BLOCKSIZE)
    cut = 4 * groups
    state2 = replace(template.state2, absmax=stats[:cut].view(FLOAT32))
    offset = stats[cut:cut + 4].view(FLOAT32).reshape(())
    return replace(template, absmax=stats[cut + 4:], offset=offset, state2=state2)


def template_to(template: QuantState, device) -> QuantState:
    """``template`` with its codebooks on ``device``."""
    state2 = template.state2
    if state2 is not None:
        state2 = replace(state2, code=state2.code.to(device))
    return replace(template, code=template.code.to(device), state2=state2)
