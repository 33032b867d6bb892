"""The registry of q4lab's 4-bit number formats: one entry per ``quant_type``, read by the API
(``q4lab.quantize_4bit`` / ``dequantize_4bit`` / ``bits_per_param``), the state checks, the
quality lab and the notebooks. Plain Python (no NumPy, no torch), like ``q4lab.constants``.

Sources, per family:
- "bnb": QLoRA (arXiv 2305.14314) §2-§3 as bitsandbytes stores it (``functional.py::
  quantize_4bit``): a 16-entry table, a float32 absmax per block, optional double quantization.
- "mx": OCP Microscaling Formats (MX) v1.0 §5-§6 (MXFP4: E2M1 elements, one E8M0 scale per 32)
  and NVIDIA NVFP4 (E2M1 elements, one E4M3 scale per 16, one float32 scale per tensor), stored
  as torchao ``prototype/mx_formats`` does (``to_mx`` / ``nvfp4_quantize``: first element in
  the LOW nibble, scales in a separate uint8 array).
- "gguf": ggml's block types as the gguf package writes them (``gguf/quants.py``,
  ``ggml-quants.c``): self-contained blocks, an fp16 scale interleaved with the codes; in
  each 32-value group byte j holds value j (low nibble) and value j + 16 (high nibble).

Every rounding rule is in the reference module named by ``reference``; docs/formats.md compares
them. ``bits`` are storage bits per parameter for a tensor whose size is a multiple of the block.
"""
from __future__ import annotations

from dataclasses import dataclass

from .constants import BLOCKSIZES


@dataclass(frozen=True)
class QuantType:
    """One 4-bit format: how values are drawn, scaled, stored and checked."""

    name: str
    family: str              # "bnb" | "mx" | "gguf"
    title: str               # one line for tables
    element: str             # what a 4-bit code means
    block_scale: str         # what each block stores besides the codes
    default_blocksize: int
    blocksizes: tuple        # the blocksizes the format allows
    layout: str              # "bnb" | "torchao" | "gguf": the byte order of the stored tensor
    can_quantize: bool       # q4lab has a quantizer (False: dequantize GGUF blocks only)
    block_bytes: int = 0     # gguf: bytes per self-contained block (codes and scales)
    scale_bytes: int = 0     # mx: bytes of block scale per block, in state.absmax
    tensor_scale: bool = False  # a float32 scale per tensor (NVFP4's second level)
    reference: str = ""      # the q4lab.reference module that specifies it
    anchor: str = ""         # the outside implementation it is checked against, byte for byte

    def check_blocksize(self, blocksize) -> int:
        """``blocksize`` (None: the format's own) as an int, or a ValueError naming the fix."""
        if blocksize is None:
            return self.default_blocksize
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) and not (
                hasattr(blocksize, "__index__") and type(blocksize).__module__ == "numpy"):
            raise ValueError(f"blocksize={blocksize!r} is not supported; use one of "
                             f"{self.blocksizes}")
        if int(blocksize) not in self.blocksizes:
            if len(self.blocksizes) == 1:
                raise ValueError(
                    f"quant_type={self.name!r} has a fixed block of {self.default_blocksize} "
                    f"values ({self.title}); blocksize={blocksize!r} does not match: leave "
                    f"blocksize unset or pass {self.default_blocksize}")
            raise ValueError(f"blocksize={blocksize!r} is not supported; use one of "
                             f"{self.blocksizes}")
        return int(blocksize)

    def bits(self, blocksize: int | None = None, double_quant: bool = False) -> float:
        """Storage bits per parameter of a large tensor (bnb with double quant: absmax codes of
        8 bits plus a float32 per 256 blocks; the per-tensor float32 is not counted)."""
        blocksize = self.check_blocksize(blocksize)
        if self.family == "gguf":
            return 8.0 * self.block_bytes / blocksize
        if self.family == "mx":
            return 4.0 + 8.0 * self.scale_bytes / blocksize
        if double_quant:
            return 4.0 + (8.0 + 32.0 / 256) / blocksize
        return 4.0 + 32.0 / blocksize


_BNB = dict(family="bnb", default_blocksize=64, blocksizes=BLOCKSIZES, layout="bnb",
            can_quantize=True, reference="q4lab.reference.blockwise")

REGISTRY: dict[str, QuantType] = {q.name: q for q in (
    QuantType("nf4", title="NF4 (QLoRA NormalFloat)", element="16 normal quantiles in [-1, 1]",
              block_scale="float32 absmax (or an 8-bit code with double quant)",
              anchor="bitsandbytes quantize_4bit(quant_type='nf4')", **_BNB),
    QuantType("fp4", title="FP4 (bitsandbytes)", element="E2M1 magnitudes / 6, bnb bit order",
              block_scale="float32 absmax (or an 8-bit code with double quant)",
              anchor="bitsandbytes quantize_4bit(quant_type='fp4')", **_BNB),
    QuantType("int4", title="INT4 (uniform, q4lab only)", element="k/7, k = -7..7",
              block_scale="float32 absmax (or an 8-bit code with double quant)",
              anchor="none (q4lab's own comparison grid)", **_BNB),
    QuantType("mxfp4", family="mx", title="MXFP4 (OCP MX v1.0)",
              element="E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}",
              block_scale="E8M0 power of two per 32 values", default_blocksize=32,
              blocksizes=(32,), layout="torchao", can_quantize=True, scale_bytes=1,
              reference="q4lab.reference.mx",
              anchor="torchao to_mx(x, torch.float4_e2m1fn_x2, 32)"),
    QuantType("nvfp4", family="mx", title="NVFP4 (NVIDIA)",
              element="E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}",
              block_scale="E4M3 per 16 values, times one float32 per tensor",
              default_blocksize=16, blocksizes=(16,), layout="torchao", can_quantize=True,
              scale_bytes=1, tensor_scale=True, reference="q4lab.reference.mx",
              anchor="torchao nvfp4_quantize(x, 16, per_tensor_scale)"),
    QuantType("q4_0", family="gguf", title="GGUF Q4_0", element="d·(q - 8), q = 0..15",
              block_scale="fp16 d per 32 values (d = -max/8, signed)", default_blocksize=32,
              blocksizes=(32,), layout="gguf", can_quantize=True, block_bytes=18,
              reference="q4lab.reference.gguf_quants", anchor="gguf.quants.quantize(Q4_0)"),
    QuantType("q4_1", family="gguf", title="GGUF Q4_1", element="d·q + m, q = 0..15",
              block_scale="fp16 d and fp16 min m per 32 values", default_blocksize=32,
              blocksizes=(32,), layout="gguf", can_quantize=True, block_bytes=20,
              reference="q4lab.reference.gguf_quants", anchor="gguf.quants.quantize(Q4_1)"),
    QuantType("q4_k", family="gguf", title="GGUF Q4_K (k-quant)", element="d·sc·q - dmin·m",
              block_scale="fp16 d, dmin per 256; 6-bit scale and min per 32",
              default_blocksize=256, blocksizes=(256,), layout="gguf", can_quantize=False,
              block_bytes=144, reference="q4lab.reference.gguf_quants",
              anchor="gguf.quants.dequantize(Q4_K)"),
    QuantType("iq4_nl", family="gguf", title="GGUF IQ4_NL (non-linear)",
              element="d·kvalues[q], a 16-entry int8 table", block_scale="fp16 d per 32 values",
              default_blocksize=32, blocksizes=(32,), layout="gguf", can_quantize=False,
              block_bytes=18, reference="q4lab.reference.gguf_quants",
              anchor="gguf.quants.dequantize(IQ4_NL)"),
)}

#: Every format name, registry order.
ALL_QUANT_TYPES = tuple(REGISTRY)
#: The formats q4lab can quantize to.
QUANTIZABLE = tuple(q for q in REGISTRY if REGISTRY[q].can_quantize)


def get(quant_type) -> QuantType:
    """The registry entry of ``quant_type``, or a ValueError listing the known names."""
    if not isinstance(quant_type, str) or quant_type not in REGISTRY:
        raise ValueError(f"quant_type={quant_type!r} is unknown; use one of {ALL_QUANT_TYPES}")
    return REGISTRY[quant_type]


def family(quant_type) -> str:
    return get(quant_type).family
