"""The AVX-512F `permute` form of the fused matmul (csrc/q4_matmul_permute.cpp) compiles to what it
claims on an AVX-512 machine, checked on any machine: its assembly for ``-march=x86-64-v4``.

On a CPU without AVX-512 the tests run the same source lowered lane by lane by the compiler
(tests/test_matmul.py checks its bytes against the reference); what an AVX-512 build makes of it
is checked here, from the assembly: the lookups are `vpermps` on 512-bit registers fed by
`vpmovzxbd`, nothing is lowered lane by lane (`vpextrd`/`vinsertps`), and no multiply is fused
with an add (`vfmadd`, forbidden by the spec's one-rounding-per-operation rule). The flags are the
real build's (``q4lab._build.CXX_FLAGS``) with ``-march=native`` replaced.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from q4lab import _build

CXX = shutil.which("c++") or shutil.which("g++")
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "q4_matmul_permute.cpp"


def avx512_assembly(tmp_path) -> str:
    from torch.utils.cpp_extension import include_paths

    flags = [f if f != "-march=native" else "-march=x86-64-v4" for f in _build.CXX_FLAGS]
    out = tmp_path / "permute.s"
    cmd = [CXX, "-S", str(SOURCE), "-o", str(out), "-std=c++17", *flags,
           *[f"-I{p}" for p in include_paths()], f"-I{SOURCE.parent}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    return out.read_text()


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_permute_form_compiles_to_512_bit_permutes(tmp_path):
    asm = avx512_assembly(tmp_path)
    lookups = re.findall(r"\bvpermps\b[^\n]*%zmm", asm)
    widen = re.findall(r"\bvpmovzxbd\b[^\n]*%zmm", asm)
    assert len(lookups) >= 4, f"expected >= 4 vpermps on zmm (2 columns x 2 halves), got {lookups}"
    assert len(widen) >= 2, f"expected vpmovzxbd into zmm, got {widen}"
    lane_by_lane = re.findall(r"\b(vpextrd|vinsertps|vpinsrd)\b", asm)
    assert not lane_by_lane, f"lowered lane by lane: {sorted(set(lane_by_lane))}"
    fused = re.findall(r"\bvf(n?m(add|sub)\w*)", asm)
    assert not fused, f"FMA contraction in the kernel: {fused[:5]}"
