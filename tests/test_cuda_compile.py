"""Compile-only check of every ``csrc/*.cu`` with nvcc against torch's headers
(docs/architecture.md §2, §3).

The CI and dev machines have a CPU-only torch and a partial CUDA 13 toolkit (nvcc, cudart), so the
CUDA kernels cannot be linked or run here; this test proves they compile, with the flags the real
build uses (``q4lab._build.CUDA_FLAGS``: ``--fmad=false --ftz=false --prec-div=true``, no
``--use_fast_math``) for sm_90. The CPU wheel lacks ``c10/cuda/impl/cuda_cmake_macros.h`` (generated
by torch's CMake); the test writes it into a temporary include directory, with the content a CUDA
build of torch ships. A compile error in the .cu fails this test (checked by breaking it once).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from q4lab import _build

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def nvcc_command(source, output, include_dir) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{include_dir}", f"-I{source.parent}",
                                                     f"-I{sysconfig_include()}"]
    return [NVCC, "-c", str(source), "-o", str(output), "-std=c++20", *includes,
            *_build.CUDA_FLAGS, "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=q4lab_compile_check",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-diag-suppress", "20013,20015,3306", "-Werror", "cross-execution-space-call"]


def sysconfig_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def test_flags_have_no_fast_math():
    flags = " ".join(_build.CUDA_FLAGS + _build.CXX_FLAGS)
    assert "--fmad=false" in flags and "--ftz=false" in flags and "-ffp-contract=off" in flags
    assert "fast-math" not in flags.replace("-fno-fast-math", "") and "use_fast_math" not in flags


CUDA_SOURCES = sorted(_build.csrc_dir().glob("*.cu"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_every_cuda_source_compiles_to_object(tmp_path):
    """Every ``csrc/*.cu`` (the quantize/dequantize ops and the fused matmul; a new file is picked
    up by its name) compiles to an object holding sm_90 code. The nvcc processes run side by side:
    each spends most of its time parsing torch's headers on one core."""
    assert {p.name for p in CUDA_SOURCES} >= {"q4_cuda.cu", "q4_matmul_cuda.cu"}, CUDA_SOURCES
    include_dir = tmp_path / "include"
    (include_dir / "c10" / "cuda" / "impl").mkdir(parents=True)
    (include_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
    jobs = {}
    for source in CUDA_SOURCES:
        obj = tmp_path / (source.stem + ".o")
        jobs[source] = (obj, subprocess.Popen(nvcc_command(source, obj, include_dir), text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
    for source, (obj, proc) in jobs.items():
        output, _ = proc.communicate(timeout=900)
        errors = [ln for ln in output.splitlines() if "error" in ln]
        assert proc.returncode == 0, f"nvcc failed on {source.name}:\n" + "\n".join(
            errors[:20] or [output[-3000:]])
        assert obj.stat().st_size > 0, source.name
        if os.path.exists(cuobjdump):   # the object holds sm_90 code (cuobjdump lists it)
            listing = subprocess.run([cuobjdump, "-lelf", "-lptx", str(obj)], capture_output=True,
                                     text=True).stdout
            assert "sm_90" in listing, (source.name, listing)
        print(f"compiled {source.name} -> {obj.stat().st_size} bytes", file=sys.stderr)
