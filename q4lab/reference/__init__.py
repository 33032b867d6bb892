"""q4lab.reference: the NumPy + SciPy specification of q4lab's 4-bit format (no torch needed).

Read in this order: ``codebooks`` (NF4 from the normal quantiles, FP4, the dynamic map, thresholds),
``blockwise`` (absmax, reciprocal, scale, encode, pack), ``double_quant`` (offset, 8-bit absmax),
``api`` (quantize_4bit / dequantize_4bit), ``matmul`` (the fused y = x · Ŵᵀ and its summation
order). The C++/CUDA kernels in ``csrc/`` follow it line by line.

The other formats of ``q4lab.quant_types`` (docs/formats.md): ``mx`` (MXFP4, NVFP4: E2M1 with
E8M0 / E4M3 scales), ``gguf_quants`` (Q4_0, Q4_1, Q4_K, IQ4_NL) and ``block_formats`` (their
checks, states and dispatch); ``csrc/q4_formats.h`` is their C++/CUDA twin.
"""
from .api import dequantize_4bit, quantize_4bit, round_to_bfloat16, state_absmax
from .blockwise import BLOCKSIZES
from .codebooks import (codebook, dynamic_map, fp4_codebook, fp4_magnitude_order, int4_codebook,
                        nf4_codebook, thresholds)
from .double_quant import exact_mean_f32
from .matmul import matmul_4bit

__all__ = ["quantize_4bit", "dequantize_4bit", "nf4_codebook", "fp4_codebook", "int4_codebook",
           "dynamic_map", "codebook", "thresholds", "fp4_magnitude_order", "exact_mean_f32",
           "state_absmax", "round_to_bfloat16", "BLOCKSIZES", "matmul_4bit"]
