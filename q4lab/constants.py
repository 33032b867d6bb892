"""The constants of q4lab's 4-bit format, written once (docs/format.md §1, §5-§7, §10).

Every Python module, test and benchmark imports them from here; the C++/CUDA kernels get them
GENERATED into ``csrc/q4_tables.h`` by ``q4lab/_gen_tables.py`` (a test regenerates and diffs the
header), so no literal of these values is typed anywhere else. Plain Python: importable without
NumPy or torch. The torch dtype maps built from ``DTYPES`` are in ``q4lab.ops``
(``TORCH_DTYPES`` / ``DTYPE_OF_NAME``), the only place that needs torch for them.
"""
from __future__ import annotations

#: Elements per absmax block (§1): powers of two from 32 to 4096. QLoRA's default is 64.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = BLOCKSIZES[0], BLOCKSIZES[-1]

#: Double quantization (§7): absmax values per nested group, the nested absmax dtype, and the
#: ``quant_type`` of the nested state (codes of bitsandbytes' 256-entry dynamic map).
NESTED_BLOCKSIZE = 256
NESTED_DTYPE = "float32"
NESTED_QUANT_TYPE = "dynamic"
DYNAMIC_CODES = 256

#: 4-bit formats. The order is the C++ enum ``Q4QuantType`` (generated). ``int4`` is q4lab-only,
#: for comparison; bitsandbytes stores ``nf4`` and ``fp4``.
QUANT_TYPES = ("nf4", "fp4", "int4")
BNB_QUANT_TYPES = ("nf4", "fp4")
CODES = 16

#: The code of 0.0 (§5, §6): all-zero blocks and the pad nibble of an odd-length input.
ZERO_CODES = {"nf4": 0b0111, "fp4": 0b0000, "int4": 0b0111}

#: FP4's sign bit (§4): set iff the input is < 0.
FP4_SIGN_BIT = 0b1000

#: Step 3 (§3): blocks whose absmax lies outside [SMALL_ABSMAX, LARGE_ABSMAX) are first scaled by
#: the exact power of two UPSCALE (subnormal absmax) or DOWNSCALE (huge absmax).
SMALL_ABSMAX, LARGE_ABSMAX = 2.0**-126, 2.0**126
UPSCALE, DOWNSCALE = 2.0**24, 2.0**-24

#: Input, output and compute dtypes (§1, §8), and their sizes in bytes.
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: Bytes of one stored double-quant offset (float32, one per tensor; §11).
OFFSET_BYTES = 4
