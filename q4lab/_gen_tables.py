"""Generate ``csrc/q4_tables.h`` from the NumPy specification (``q4lab/reference/codebooks.py``)
and ``q4lab/constants.py``.

The C++ and CUDA kernels never carry a hand-copied constant (bitsandbytes' habit of retyping decimal
literals in ``kernels.cu::dQuantizeNF4`` is what makes its thresholds differ from its codebook):
every table is written here as float32 *bit patterns*, straight from the reference arrays, and every
format constant (blocksizes, nested blocksize, quant type names and their enum, zero codes, the FP4
sign bit) straight from ``q4lab.constants``. A test (``tests/test_kernels.py``) regenerates the
header and diffs it against the committed one (docs/architecture.md §2).

    python -m q4lab._gen_tables            # rewrite csrc/q4_tables.h
    python -m q4lab._gen_tables --check    # exit 1 if the committed header is stale
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import constants as c
from .reference import codebooks as cb

HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "q4_tables.h"
PER_LINE = 6


def _hex_rows(values: np.ndarray, fmt: str) -> str:
    items = [fmt.format(int(v)) for v in values]
    rows = [", ".join(items[i:i + PER_LINE]) for i in range(0, len(items), PER_LINE)]
    return ",\n".join("    " + row for row in rows)


def _f32_table(name: str, values, comment: str) -> str:
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    return (f"// {comment}\n"
            f"static const uint32_t {name}[{bits.size}] = {{\n"
            f"{_hex_rows(bits, '0x{:08x}u')}\n}};\n")


def _u8_table(name: str, values, comment: str) -> str:
    values = np.asarray(values, dtype=np.uint8)
    return (f"// {comment}\n"
            f"static const uint8_t {name}[{values.size}] = {{\n{_hex_rows(values, '{:d}')}\n}};\n")


def _per_type(ctype: str, name: str, values, comment: str) -> str:
    items = ", ".join(str(v) for v in values)
    return (f"// {comment}\n"
            f"static const {ctype} {name}[Q4_NUM_QUANT_TYPES] = {{{items}}};\n")


def _constants() -> str:
    """The format constants of ``q4lab.constants`` as C++ (one enum value per quant type, in the
    order of ``QUANT_TYPES``)."""
    enum = ", ".join(f"Q4_{qt.upper()} = {i}" for i, qt in enumerate(c.QUANT_TYPES))
    names = ", ".join(f'"{qt}"' for qt in c.QUANT_TYPES)
    counts = [cb.thresholds(qt).size for qt in c.QUANT_TYPES]
    log2 = int(c.NESTED_BLOCKSIZE).bit_length() - 1
    assert 1 << log2 == c.NESTED_BLOCKSIZE
    return "\n".join([
        "// ---- constants (q4lab/constants.py) ----\n"
        f"#define Q4_MIN_BLOCKSIZE {c.MIN_BLOCKSIZE}\n"
        f"#define Q4_MAX_BLOCKSIZE {c.MAX_BLOCKSIZE}\n"
        f"#define Q4_NESTED_BLOCKSIZE {c.NESTED_BLOCKSIZE}\n"
        f"#define Q4_NESTED_BLOCKSIZE_LOG2 {log2}\n"
        f"#define Q4_CODES {c.CODES}\n"
        f"#define Q4_DYNAMIC_CODES {c.DYNAMIC_CODES}\n"
        f"#define Q4_FP4_SIGN_BIT {c.FP4_SIGN_BIT}u\n"
        f"#define Q4_NUM_QUANT_TYPES {len(c.QUANT_TYPES)}\n"
        f"#define Q4_MAX_THRESHOLDS {max(counts)}  // unused slots hold +Inf\n"
        "// step 3: absmax outside [SMALL, LARGE) is first scaled by an exact power of two\n"
        + "".join(f"#define Q4_{name} {float(getattr(c, name)).hex()}f\n"
                  for name in ("SMALL_ABSMAX", "LARGE_ABSMAX", "UPSCALE", "DOWNSCALE")),
        f"// every supported blocksize\n#define Q4_NUM_BLOCKSIZES {len(c.BLOCKSIZES)}\n"
        f"static const int Q4_BLOCKSIZES[Q4_NUM_BLOCKSIZES] = "
        f"{{{', '.join(str(b) for b in c.BLOCKSIZES)}}};\n",
        f"enum Q4QuantType {{ {enum} }};\n"
        f"static const char* const Q4_QUANT_TYPE_NAMES[Q4_NUM_QUANT_TYPES] = {{{names}}};\n",
        _per_type("uint8_t", "Q4_ZERO_CODE", [c.ZERO_CODES[qt] for qt in c.QUANT_TYPES],
                  "code of 0.0 per quant type (all-zero blocks, pad nibble of odd n)"),
        _per_type("int", "Q4_THRESHOLD_COUNT", counts, "thresholds per quant type"),
    ])


def _f32_tables() -> list:
    """The float32 tables: (C name, the reference array, comment), in header order."""
    return [
        ("Q4_NF4_CODEBOOK_BITS", cb.nf4_codebook(),
         "NF4 levels, ascending; index = 4-bit code (reference.nf4_codebook)"),
        ("Q4_NF4_THRESHOLD_BITS", cb.thresholds("nf4"),
         "NF4 thresholds t_k = RN(midpoint); code = #{k : t_k < xn}"),
        ("Q4_FP4_CODEBOOK_BITS", cb.fp4_codebook(),
         "FP4 levels in bitsandbytes' bit order (bit 3 = sign; reference.fp4_codebook)"),
        ("Q4_FP4_THRESHOLD_BITS", cb.thresholds("fp4"),
         "FP4 thresholds over the 8 magnitudes sorted ascending"),
        ("Q4_INT4_CODEBOOK_BITS", cb.int4_codebook(),
         "INT4 levels k/7, k = -7..7, plus a duplicate +1 at code 15 (comparison only)"),
        ("Q4_INT4_THRESHOLD_BITS", cb.thresholds("int4"),
         "INT4 thresholds over the 15 distinct levels"),
        ("Q4_DYNAMIC_MAP_BITS", cb.dynamic_map(),
         "bitsandbytes' signed dynamic 8-bit map, ascending (reference.dynamic_map)"),
        ("Q4_DYNAMIC_MIDPOINT_BITS", cb.thresholds("dynamic"),
         "dynamic-map midpoints; exact ties go to the even index"),
    ]


def render() -> str:
    """The full text of ``csrc/q4_tables.h``."""
    tables = [_f32_table(*spec) for spec in _f32_tables()]
    fp4_order = _u8_table("Q4_FP4_ORDER", cb.fp4_magnitude_order(),
                          "FP4 3-bit magnitude code of the c-th smallest magnitude "
                          "(fp4_magnitude_order)")
    per_type = "// per quant type, index = Q4QuantType\n" + "".join(
        f"static const uint32_t* const Q4_{kind}_BITS[Q4_NUM_QUANT_TYPES] = {{\n    "
        + ", ".join(f"Q4_{qt.upper()}_{kind}_BITS" for qt in c.QUANT_TYPES) + "};\n"
        for kind in ("CODEBOOK", "THRESHOLD"))
    parts = [
        '// GENERATED by q4lab/_gen_tables.py from q4lab/reference/codebooks.py and\n'
        '// q4lab/constants.py. DO NOT EDIT.\n'
        '// Regenerate: python -m q4lab._gen_tables   (tests/test_kernels.py diffs this file).\n'
        '// Every float is its IEEE-754 float32 bit pattern: no decimal literal is re-rounded.\n'
        '#pragma once\n#include <stdint.h>\n',
        _constants(), *tables[:4], fp4_order, *tables[4:], per_type,
    ]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = HEADER_PATH.read_text() if HEADER_PATH.exists() else ""
        if current != text:
            print(f"{HEADER_PATH} is stale: run python -m q4lab._gen_tables", file=sys.stderr)
            return 1
        return 0
    HEADER_PATH.write_text(text)
    print(f"wrote {HEADER_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
