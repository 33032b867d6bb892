"""``q4lab.matmul_4bit``: y = x · Ŵᵀ (+ bias) straight from the packed 4-bit weight, never
dequantized.

The torch front end of ``torch.ops.q4lab.matmul_4bit`` (``csrc/q4_matmul_cpu.cpp``, ``csrc/
q4_matmul_cuda.cu``) and of its specification ``q4lab.reference.matmul_4bit`` (the summation order
is written there and in ``docs/format.md``, "Fused matmul"); both give the same bytes. This is what
bitsandbytes' ``matmul_4bit`` does for one-row inputs with ``gemv_4bit`` (``functional.py``), with
the difference that q4lab's result does not depend on the machine, the ISA or the thread count.

Decode (one token at a time) reads each weight once per token, so its speed is set by the bytes
read: 4-bit weights are 7.1x fewer bytes than float32 (4.5 bits with absmax), and this path reads
only those bytes. ``Linear4bit.forward`` uses it when autograd is off (``generate``) for inputs of
at most ``FUSED_MAX_ROWS`` rows; longer inputs (prefill) dequantize once and call a float matmul,
which is faster there, and training keeps that path too, so its numbers are unchanged.
Gradients: d/dx = grad · Ŵ with the dequantized weight (the packed weight is frozen, as in QLoRA).
"""
from __future__ import annotations

import math

import torch

from . import ops
from . import reference as ref
from .state import QuantState

#: Rows (tokens) up to which Linear4bit uses the fused kernel; above, dequantize + F.linear wins
#: (bench/bench_infer.py on a 2-core AVX-512 machine, 4096x4096: fused is ~12x faster for 1 row,
#: 2.8x for 8, 1.6x for 16, and slower from 32 rows; 8 leaves a margin for smaller layers).
FUSED_MAX_ROWS = 8


def check_matmul_args(x, packed, state, bias) -> tuple[int, int]:
    """Raise a clear error for anything ``matmul_4bit`` cannot take; returns (N, K)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ops.TORCH_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; matmul_4bit takes float32, float16 or bfloat16")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be the q4lab.QuantState returned with the packed weight "
                        f"(quantize_4bit returns (packed, state); a Linear4bit holds "
                        f"layer.quant_state), got {type(state).__name__}")
    ops.check_state(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight (out_features, in_features); the state "
                         f"has shape {tuple(state.shape)}")
    n, k = (int(d) for d in state.shape)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight {tuple(state.shape)} has "
                         f"in_features={k}: x's last dimension must be {k}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.device}; move one of "
                         f"them (layer.to(device) or x.to(device))")
    if x.is_meta:
        raise ValueError("x and the weight are on the meta device, which holds no data (a model "
                         "built with init_empty_weights / device='meta'); load the weights first "
                         "(q4lab.from_pretrained, or layer.to_empty + load_state_dict)")
    if not x.is_contiguous():
        raise ValueError(f"x (shape {tuple(x.shape)}, strides {x.stride()}) is not contiguous; "
                         f"pass x.contiguous()")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in ops.TORCH_DTYPES:
            raise TypeError(f"bias must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, the weight needs ({n},)")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return n, k


def kernel_args(packed, state) -> tuple:
    """The weight's arguments of ``torch.ops.q4lab.matmul_4bit`` (everything between x and bias),
    in the order of its schema; ``Linear4bit`` builds them once per weight, not once per token."""
    nested = state.nested
    return (packed.reshape(-1), state.absmax, state.state2.absmax if nested else None,
            state.offset.reshape(()).float() if nested else None, int(state.blocksize),
            state.quant_type, int(state.shape[0]))


def _kernel(x2d: torch.Tensor, packed, state, bias, isa: str = "auto", args=None) -> torch.Tensor:
    register_fake()
    # The bias goes to the op in its own dtype (the op widens it to float32, exactly): widening it
    # here would let torch.compile fold a caller's float32 -> bf16 -> float32 rounding away.
    return torch.ops.q4lab.matmul_4bit(x2d, *(args or kernel_args(packed, state)),
                                       None if bias is None else bias.contiguous(), isa)


def _reference(x2d: torch.Tensor, packed, state, bias) -> torch.Tensor:
    bias_np = None if bias is None else bias.detach().cpu().float().numpy()
    y = ref.matmul_4bit(x2d.detach().cpu().float().numpy(), packed.detach().cpu().numpy(),
                        state.numpy(), bias_np)
    return torch.from_numpy(y).to(x2d.device).to(x2d.dtype)  # float32 -> RNE fp16/bf16


class _FusedMatmul(torch.autograd.Function):
    """Forward: the fused kernel (or the reference). Backward: d/dx = grad · Ŵ, with Ŵ dequantized
    in grad's dtype (as ``nn._DequantMatmul``); d/dbias = sum of grad; the weight gets none."""

    @staticmethod
    def forward(ctx, x2d, packed, state, bias, which):
        ctx.packed, ctx.state = packed, state
        if which == "reference":
            return _reference(x2d, packed, state, bias)
        return _kernel(x2d, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ops.dequantize_4bit(ctx.packed, ctx.state, dtype=grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_x, None, None, grad_bias, None


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``x @ Ŵ.T (+ bias)`` for a quantized 2-D weight Ŵ (``state.shape`` = (N, K)), computed from
    the packed codes without materialising Ŵ. ``x``: (..., K) float32/float16/bfloat16, contiguous,
    on the weight's device. Returns (..., N) in x's dtype (computed in float32, rounded once at the
    end). ``backend``: "auto" | "reference" | "cpu" | "cuda", as for ``quantize_4bit``."""
    if isinstance(state, QuantState) and not state.is_torch and isinstance(packed, torch.Tensor):
        state = state.to(packed.device)
    n, k = check_matmul_args(x, packed, state, bias)
    return _fused(x, packed, state, bias, ops.resolve_backend(backend, x.device))


def _fused(x, packed, state, bias, which: str) -> torch.Tensor:
    """The product for checked arguments; autograd only when a gradient is wanted (decode runs
    under no_grad and should not pay for it)."""
    n, k = int(state.shape[0]), int(state.shape[1])
    lead = tuple(x.shape[:-1])
    x2d = x.reshape(math.prod(lead), k)
    if torch.is_grad_enabled() and (x2d.requires_grad or (bias is not None and bias.requires_grad)):
        y = _FusedMatmul.apply(x2d, packed, state, bias, which)
    elif which == "reference":
        y = _reference(x2d, packed, state, bias)
    else:
        y = _kernel(x2d, packed, state, bias)
    return y.reshape(*lead, n)


def linear_forward(x: torch.Tensor, packed, state, bias, args=None) -> torch.Tensor:
    """``Linear4bit``'s fused path: the layer checked its packed weight and state when it was built,
    and the caller checked that a native kernel exists for x's device; only x is checked here.
    ``args``: the layer's cached :func:`kernel_args` (decode calls this once per layer per token, so
    the Python around the kernel is kept to a few tensor calls)."""
    k = state.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the layer has in_features={k}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _fused(x.contiguous(), packed, state, bias, x.device.type)
    y = _kernel(x.contiguous().view(-1, k), packed, state, bias, "auto", args)
    return y.view(*x.shape[:-1], y.shape[-1])


def isas() -> list[str]:
    """The CPU instruction-set forms of the fused kernel compiled here ('portable', 'avx2',
    'avx512'); 'auto' uses the last. All give the same bytes (tests/test_matmul.py)."""
    if ops.kernel_status("cpu") is not True:
        return []
    register_fake()
    return list(torch.ops.q4lab.matmul_4bit_isas())


_fake_registered = False


def register_fake() -> None:
    """Shapes without data, for torch.compile and opcheck (pattern of pytorch/extension-cpp);
    registered once, after the kernels are loaded (the ops must exist first)."""
    global _fake_registered
    if _fake_registered:
        return
    _fake_registered = True

    @torch.library.register_fake("q4lab::matmul_4bit")
    def _(x, packed, absmax, absmax2, offset, blocksize, quant_type, out_features, bias,
          isa="auto"):
        return x.new_empty((x.shape[0], out_features))

    torch.library.register_fake("q4lab::matmul_4bit_out")(lambda *args, **kwargs: None)
