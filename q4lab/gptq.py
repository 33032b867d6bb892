"""GPTQ: data-aware 4-bit rounding on the same grid as round-to-nearest (RTN).

Source: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323), Algorithm 1, as in the reference implementation
(``IST-DASLab/gptq``, ``gptq.py::GPTQ.fasterquant``): with H = 2·XᵀX/n + λ·mean(diag H)·I
(λ = ``damp``), the upper Cholesky factor U of H⁻¹, columns are quantized left to right and each
column's rounding error, divided by U[j, j], is spread over the not-yet-quantized columns along
U[j, j+1:]. The grid is q4lab's: the 16 values of ``quant_type`` times a per-row scale per group
of ``blocksize`` input columns, the scale fixed from the (error-updated) weights when the group
starts (GPTQ's ``groupsize``): NF4 / FP4 / INT4 use the absmax (bitsandbytes' rule), MXFP4 the
power of two 2^(floor(log2 amax) - 2) (OCP MX v1.0 §6.3). With H = I the result is RTN exactly
(tests/test_gptq.py): each column is rounded with q4lab's own arithmetic (``GroupGrid``: the
reference's reciprocal, scale and encode steps, docs/format.md §3-§5; E2M1 for MXFP4).

- :func:`gptq_quantize`: one weight and its Hessian -> dequantized weight, codes, scales.
- :func:`hessian_from_inputs`: H from a layer's input activations.
- :func:`to_state`: NF4 / FP4 / INT4 result as q4lab ``(packed, QuantState)`` (no double quant).
- :func:`calibrate`: capture a model's layer inputs on token ids (forward hooks).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .reference import blockwise, codebook, mx
from .reference.blockwise import pack_nibbles
from .state import QuantState

GPTQ_QUANT_TYPES = ("nf4", "fp4", "int4", "mxfp4")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in GPTQ_QUANT_TYPES:
        raise ValueError(f"GPTQ here supports {GPTQ_QUANT_TYPES}, got {quant_type!r}")


class GroupGrid:
    """The grid of one group of columns: per-row scales fixed from ``w_group`` (float32 NumPy,
    rows x blocksize) with q4lab's own arithmetic, so that rounding a column here is exactly
    what q4lab.quantize_4bit does to it (reference.blockwise / reference.mx)."""

    def __init__(self, w_group: np.ndarray, quant_type: str):
        self.quant_type = quant_type
        amax = np.abs(w_group).max(axis=1).astype(np.float32)
        if quant_type == "mxfp4":
            self.scale_code = mx.e8m0_exponent(amax)
            self.scale = mx.e8m0_decode(self.scale_code)
            self.divisor = np.maximum(self.scale, np.float32(2.0 ** -126))
        else:
            self.scale = amax
            self.prescale, self.recip = blockwise.reciprocal_scale(amax)
            self.table = codebook(quant_type)

    def round(self, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8, dequantized float32) of one float32 column."""
        x = column.astype(np.float32)
        if self.quant_type == "mxfp4":
            codes = mx.e2m1_encode((x / self.divisor).astype(np.float32))
            return codes, (mx.e2m1_codebook()[codes] * self.scale).astype(np.float32)
        xn = blockwise.scale_blocks(x[:, None], self.prescale, self.recip)[:, 0]
        codes = blockwise.encode(xn, x, self.quant_type)
        return codes, (self.table[codes] * self.scale).astype(np.float32)


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2·XᵀX / n in float64 from inputs of shape (..., in_features)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2.0 * x.T @ x / x.shape[0]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quant_type: str = "nf4",
                  blocksize: int = 64, damp: float = 0.01, progress: bool = False) -> dict:
    """GPTQ on one (out, in) weight. Returns {"weight": dequantized float32, "codes": uint8
    (out, in), "scales": float32 (out, in / blocksize)}. ``in`` must be a multiple of
    ``blocksize``."""
    _check_quant_type(quant_type)
    if quant_type == "mxfp4" and blocksize != 32:
        raise ValueError(f"mxfp4 has a fixed block of 32, got blocksize={blocksize}")
    w = weight.detach().float().to(torch.float64).clone()
    rows, cols = w.shape
    if cols % blocksize:
        raise ValueError(f"in_features {cols} is not a multiple of blocksize {blocksize}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, cols // blocksize), dtype=np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    for j in tqdm(range(cols), desc="GPTQ columns", leave=False, disable=not progress):
        if j % blocksize == 0:
            grid = GroupGrid(w[:, j:j + blocksize].float().numpy(), quant_type)
            scales[:, j // blocksize] = grid.scale
        codes[:, j], out[:, j] = grid.round(w[:, j].float().numpy())
        err = (w[:, j] - torch.from_numpy(out[:, j]).double()) / upper[j, j]
        w[:, j + 1:] -= err[:, None] * upper[j, j + 1:][None, :]
    return {"weight": torch.from_numpy(out), "codes": torch.from_numpy(codes),
            "scales": torch.from_numpy(scales)}


def to_state(result: dict, quant_type: str = "nf4", blocksize: int = 64,
             dtype: str = "float32"):
    """A GPTQ result on the NF4 / FP4 / INT4 grid as q4lab ``(packed, state)`` (bitsandbytes
    layout, float32 absmax = the group scales, no double quantization): dequantize_4bit gives
    ``result["weight"]`` bit for bit."""
    if quant_type not in ("nf4", "fp4", "int4"):
        raise ValueError(f"to_state stores nf4 / fp4 / int4, got {quant_type!r}")
    codes = result["codes"].numpy()
    shape = tuple(codes.shape)
    packed = pack_nibbles(codes.reshape(-1), quant_type)
    absmax = result["scales"].numpy().astype(np.float32).reshape(-1)
    state = QuantState(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                       code=codebook(quant_type), absmax=absmax)
    state.validate(packed)
    return packed, state


class _Captured(Exception):
    """Raised by :func:`calibrate`'s hook once every named layer has its inputs: the rest of
    the forward pass would not change them."""


@torch.no_grad()
def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str]) -> dict:
    """{name: float32 inputs (tokens, in_features)} of the named nn.Linear layers on one
    forward pass of ``input_ids``. The pass stops as soon as the last of them has its inputs
    (the layers after it cannot change them), so calibrating an early layer costs a few blocks,
    not the whole model."""
    captured, hooks = {}, []
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module called {missing[0]!r} in the model")
    for name in names:
        def hook(module, args, _name=name):
            captured[_name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if len(captured) == len(set(names)):
                raise _Captured
        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        model(input_ids)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured


def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """Relative layer-output error ||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||² on inputs X."""
    x = inputs.double()
    ref = x @ weight.double().T
    return float(((ref - x @ approx.double().T) ** 2).sum() / (ref ** 2).sum())
