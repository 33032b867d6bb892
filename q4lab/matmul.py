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

Decode layout (``repack_rows``): the CPU ``rows`` form (AVX2) computes 32 output rows per step
with byte shuffles, the ``permute`` form (AVX-512F) 16 rows per register with one ``vpermps`` per
16 products; both want the codes of 32 rows for one byte column side by side, blocks outer;
``decode_args`` therefore keeps, per layer, a copy of the same bytes in that order (with the
absmax decoded to float32), lazily: built at the second decode call that sees the same packed
tensor object (a new object, as an FSDP all-gather makes each forward, never gets one: no
full-size copy outlives its forward), never for a tensor subclass (DTensor) or off the CPU, dropped
with ``drop_decode_cache`` or when the packed tensor dies or is written in place, and not built at
all with ``Q4LAB_REPACK=0`` / ``set_repack(False)``. Until then (and for weights it never sees
twice) the ``table`` form reads the stored bytes in place. Files and interop keep bitsandbytes'
bytes; the copy is a cache of about 1.125x the 4-bit weight (``decode_cache_bytes``).
"""
from __future__ import annotations

import math
import os
import weakref

import torch

from . import ops
from . import reference as ref
from .state import QuantState

#: Rows (tokens) up to which Linear4bit uses the fused kernel where the committed crossover table
#: (q4lab/_crossover.py, written by ``bench/bench_infer.py --write-crossover``) has no entry for
#: the kernel form that runs (CUDA, or a CPU form not measured yet).
FUSED_MAX_ROWS = 8
_max_rows: dict = {}


def fused_max_rows(device_type: str = "cpu") -> int:
    """Rows of x up to which ``Linear4bit`` runs the fused kernel on ``device_type``: the committed
    per-form crossover for the CPU form 'auto' picks here, else ``FUSED_MAX_ROWS``. A table, never
    a timing at run time (a model's output bytes must not depend on one)."""
    rows = _max_rows.get(device_type)
    if rows is None:
        from ._crossover import CROSSOVER_ROWS

        form = (isas() or ["portable"])[-1] if device_type == "cpu" else device_type
        rows = _max_rows[device_type] = int(CROSSOVER_ROWS.get(form, FUSED_MAX_ROWS))
    return rows


_auto_rows: dict = {}


def auto_fused_rows(device_type: str) -> int:
    """``fused_max_rows(device_type)`` where the native kernels load, else 0: what
    ``Linear4bit.forward`` compares a call's row count with (cached: one dict lookup per call)."""
    rows = _auto_rows.get(device_type)
    if rows is None:
        rows = _auto_rows[device_type] = (fused_max_rows(device_type)
                                          if ops.kernel_status(device_type) is True else 0)
    return rows


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


_repack_enabled = os.environ.get("Q4LAB_REPACK", "1") != "0"
_CACHE_KEY = "_q4lab_decode_cache"


def repack_enabled() -> bool:
    """Whether decode layout copies may be built (``set_repack``, ``Q4LAB_REPACK``)."""
    return _repack_enabled


def set_repack(enabled: bool) -> None:
    """Allow (default) or forbid the decode layout copies made by ``decode_args``; forbidding does
    not drop existing copies (``drop_decode_cache`` does)."""
    global _repack_enabled
    _repack_enabled = bool(enabled)


#: Position p of the decode layout's 32-byte vectors holds row 32g + ROW_OF_POSITION[p]: after the
#: AVX2 unpacks (which work inside 128-bit lanes) register j holds rows 8j .. 8j+7 in order
#: (csrc/q4_matmul_rows.cpp).
ROW_OF_POSITION = tuple(8 * (p // 4) + p % 4 if p < 16 else 8 * ((p - 16) // 4) + 4 + (p - 16) % 4
                        for p in range(32))


def repack_rows(packed: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode layout of a (N, K) weight for the CPU ``rows`` form (docs/format.md, "Decode
    layout"): the stored bytes reordered to uint8 (K/B, G, B/2, 32), G = ceil(N/32), where
    ``[b, g, c, p]`` is byte c of block b of row ``32g + ROW_OF_POSITION[p]`` (0 past N), and the
    absmax decoded to float32 (K/B, 32G) (0 past N). Needs K % B == 0 (every row has whole
    blocks). The stored bytes stay as they are; this is a copy (about 1.125x their size at B=64)."""
    return _rows_layout([_rows_of(packed, state)])


def repack_rows_stacked(weights) -> tuple:
    """The op's weight arguments for the rows of several (packed, state) weights with equal K,
    blocksize and codebook stacked in order (q4lab/decode_groups.py): one decode layout of
    N1 + N2 + ... rows."""
    _, first = weights[0]
    for _, state in weights[1:]:
        if (state.shape[1], state.blocksize, state.quant_type) != \
                (first.shape[1], first.blocksize, first.quant_type):
            raise ValueError("stacked weights need equal in_features, blocksize and quant_type")
    codes, absmax = _rows_layout([_rows_of(p, s) for p, s in weights])
    return (codes, absmax, None, None, int(first.blocksize), first.quant_type,
            sum(int(s.shape[0]) for _, s in weights))


def _rows_of(packed, state) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K/B, B/2) uint8, decoded absmax (N, K/B) float32) of one weight."""
    n, k = (int(d) for d in state.shape)
    b = int(state.blocksize)
    if k % b:
        raise ValueError(f"repack_rows needs in_features % blocksize == 0, got K={k}, B={b}")
    if state.family != "bnb":
        raise ValueError(f"the fused matmul reads NF4/FP4 weights, not {state.quant_type}")
    codes = packed.reshape(-1)[: n * k // 2].reshape(n, k // b, b // 2)
    if state.nested:
        absmax = torch.ops.q4lab.dequantize_absmax(state.absmax.reshape(-1),
                                                   state.state2.absmax.reshape(-1),
                                                   state.offset.reshape(()).float())
    else:
        absmax = state.absmax.reshape(-1).float()
    return codes, absmax.reshape(n, k // b)


def _rows_layout(parts) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.cat([c for c, _ in parts]) if len(parts) > 1 else parts[0][0]
    absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
    n, nb, half = codes.shape
    groups = -(-n // 32)
    pad = groups * 32 - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, nb, half)])
        absmax = torch.cat([absmax, absmax.new_zeros(pad, nb)])
    order = torch.tensor(ROW_OF_POSITION)
    codes = codes.reshape(groups, 32, nb, half)[:, order]                # (G, 32 positions, K/B, C)
    return (codes.permute(2, 0, 3, 1).contiguous(),                      # (K/B, G, C, 32)
            absmax.t().contiguous())                                     # (K/B, 32G), row order


class _DecodeCache:
    """One layer's kernel arguments for decode. The first call on a packed tensor object keeps only
    weak references (an FSDP all-gather's tensor, new each forward, is never kept alive); a second
    call on the same object, unwritten since, caches the arguments, with the blocked decode layout
    where allowed (see the module docstring)."""
    __slots__ = ("packed_ref", "state_ref", "version", "args", "blocked", "repackable")

    def __init__(self, packed, state):
        self.packed_ref, self.state_ref = weakref.ref(packed), weakref.ref(state)
        self.version = packed._version
        self.args = self.blocked = None
        self.repackable = (type(packed) in (torch.Tensor, torch.nn.Parameter)
                           and packed.device.type == "cpu"
                           and int(state.shape[1]) % int(state.blocksize) == 0
                           and decode_form() is not None)

    def matches(self, packed, state) -> bool:
        return (self.packed_ref() is packed and self.state_ref() is state
                and self.version == packed._version)


def decode_args(owner, packed, state) -> tuple:
    """The fused kernel's weight arguments for ``owner`` (a ``Linear4bit``), cached in it from the
    second call on the same packed tensor, with the blocked decode layout in place of the stored
    bytes where allowed (module docstring). Rebuilt when ``packed`` or ``state`` is replaced or
    ``packed`` is written in place. Under torch.compile nothing is built: the cached arguments
    (made by an eager call before), or the plain ones."""
    cache = owner.__dict__.get(_CACHE_KEY)
    if torch.compiler.is_compiling():
        return cache.args if cache is not None and cache.args is not None \
            else kernel_args(packed, state)
    if cache is None or not cache.matches(packed, state):
        owner.__dict__[_CACHE_KEY] = _DecodeCache(packed, state)
        return kernel_args(packed, state)
    if cache.args is None or (cache.blocked is None and cache.repackable and _repack_enabled):
        args = kernel_args(packed, state)
        if cache.repackable and _repack_enabled:
            cache.blocked = repack_rows(packed, state)
            args = cache.blocked + (None, None) + args[4:]
        cache.args = args
    return cache.args


def _sibling_group(module):
    """The sibling group a layer belongs to (q4lab/decode_groups.py keeps it in the layer's
    ``__dict__``), or None; looked up by key so that this module does not import that one."""
    return module.__dict__.get("_q4lab_siblings")


def drop_decode_cache(module) -> int:
    """Drop every cached decode layout under ``module`` (a model or a layer; sibling groups' stacked
    layouts too); returns the bytes freed. The next decode calls rebuild them lazily."""
    freed, groups = 0, {}
    for m in module.modules():
        cache = m.__dict__.pop(_CACHE_KEY, None)
        if cache is not None and cache.blocked is not None:
            freed += sum(t.numel() * t.element_size() for t in cache.blocked)
        if _sibling_group(m) is not None:
            groups[id(_sibling_group(m))] = _sibling_group(m)
    return freed + sum(g.drop() for g in groups.values())


def decode_cache_bytes(module) -> int:
    """Bytes held by decode layout copies under ``module`` (sibling groups' included)."""
    total, groups = 0, {}
    for m in module.modules():
        cache = m.__dict__.get(_CACHE_KEY)
        if cache is not None and cache.blocked is not None:
            total += sum(t.numel() * t.element_size() for t in cache.blocked)
        if _sibling_group(m) is not None:
            groups[id(_sibling_group(m))] = _sibling_group(m)
    return total + sum(g.cache_bytes() for g in groups.values())


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
    ``args``: the layer's cached :func:`decode_args` (decode calls this once per layer per token, so
    the Python around the kernel is one shape check and one op call; docs/architecture.md says how
    the per-call overhead is measured)."""
    k = state.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the layer has in_features={k}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _fused(x.contiguous(), packed, state, bias, x.device.type)
    if _op is None:
        register_fake()
    if not x.is_contiguous():
        x = x.contiguous()
    return _op(x, *(args or kernel_args(packed, state)), bias, "auto")  # (..., K) -> (..., N)


def isas() -> list[str]:
    """The CPU forms of the fused kernel compiled here: 'portable', 'table', 'permute' (native
    where the build has AVX-512F, elsewhere the same source lowered lane by lane, slow), and 'rows'
    where the build has AVX2; 'auto' uses the last. All give the same bytes
    (tests/test_matmul.py)."""
    if ops.kernel_status("cpu") is not True:
        return []
    register_fake()
    return list(torch.ops.q4lab.matmul_4bit_isas())


#: The CPU forms that read the decode layout (``repack_rows``) besides the stored bytes.
DECODE_LAYOUT_FORMS = ("rows", "permute")


def decode_form() -> str | None:
    """The form 'auto' runs on the decode layout here ('permute' on AVX-512F, 'rows' on AVX2), or
    None where 'auto' is a form of the stored bytes only (then no decode layout is built)."""
    forms = isas()
    return forms[-1] if forms and forms[-1] in DECODE_LAYOUT_FORMS else None


_fake_registered = False
_op = None  # torch.ops.q4lab.matmul_4bit.default, looked up once by register_fake


def register_fake() -> None:
    """Shapes without data, for torch.compile and opcheck (pattern of pytorch/extension-cpp);
    registered once, after the kernels are loaded (the ops must exist first)."""
    global _fake_registered, _op
    if _fake_registered:
        return
    _fake_registered = True

    @torch.library.register_fake("q4lab::matmul_4bit")
    def _(x, packed, absmax, absmax2, offset, blocksize, quant_type, out_features, bias,
          isa="auto"):
        return x.new_empty((*x.shape[:-1], out_features))

    torch.library.register_fake("q4lab::matmul_4bit_out")(lambda *args, **kwargs: None)
    _op = torch.ops.q4lab.matmul_4bit.default
