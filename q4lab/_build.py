"""JIT build and load of the native kernels in ``csrc/`` (docs/architecture.md, "Kernels").

``torch.utils.cpp_extension.load(..., is_python_module=False)`` compiles every ``csrc/*.cpp`` (and
every ``csrc/*.cu`` when torch has CUDA: the 4-bit ops, ``q4_*_cpu.cpp`` / ``q4_*_cuda.cu``, and the
fused matmul, ``q4_matmul_*``) with ninja into the torch extensions cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), which registers ``torch.ops.q4lab.*``
(the extension-cpp pattern). The extension name carries a hash of every csrc file, the flags and the
CPU's instruction set, so editing a header rebuilds, and a cached library is loaded directly with
``torch.ops.load_library`` (quiet, milliseconds). Flags: C++ ``-O3 -march=native -ffp-contract=off``
(no fast-math: every float op is one IEEE rounding); nvcc ``--fmad=false --ftz=false
--prec-div=true``.

Source lookup: the repository's ``csrc/`` (editable install, ``pip install -e .``); a wheel must
ship the sources as ``q4lab/csrc/*`` (package data), which is looked up first.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp",
             "-fno-finite-math-only"]
CUDA_FLAGS = ["-O3", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true",
              "-Xcompiler", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
ANNOUNCE = "building q4lab kernels, first time only (~1 min)..."
_loaded: dict = {}


def csrc_dir() -> Path | None:
    """Where the C++/CUDA sources are: package data first, then the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "q4_cpu.cpp").is_file():
            return candidate
    return None


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (-march=native code must not move to another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags as /proc/cpuinfo names them ('avx2', 'avx512f', ...; on
    Arm its 'Features'); empty where there is no /proc/cpuinfo."""
    line = _cpu_signature()
    return set(line.split(":", 1)[1].split()) if line.startswith(("flags", "Features")) else set()


def extension_name(src: Path, with_cuda: bool) -> str:
    """``q4lab_kernels_<hash>``: the hash covers every csrc file, the flags, torch and the CPU."""
    import torch

    h = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((CXX_FLAGS, CUDA_FLAGS, with_cuda, torch.__version__, sys.version_info[:2],
                   _cpu_signature())).encode())
    return f"q4lab_kernels_{'cuda_' if with_cuda else ''}{h.hexdigest()[:16]}"


def _compiler_problem() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
    return None


def _cached_library(name: str) -> Path | None:
    from torch.utils.cpp_extension import _get_build_directory

    lib = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    return lib if lib.is_file() else None


def load(with_cuda: bool | None = None) -> bool | str:
    """Build (first time) and load the kernels. True on success, else a one-line reason."""
    import torch

    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    if with_cuda in _loaded:
        return _loaded[with_cuda]
    _loaded[with_cuda] = result = _load(with_cuda)
    return result


def _load(with_cuda: bool) -> bool | str:
    import torch

    src = csrc_dir()
    if src is None:
        return "q4lab's csrc/ sources are not installed (use `pip install -e .` from the repo)"
    name = extension_name(src, with_cuda)
    cached = _cached_library(name)
    if cached is not None:
        try:
            torch.ops.load_library(str(cached))
            return True
        except OSError:
            pass  # a broken cache entry: rebuild below
    problem = _compiler_problem()
    if problem:
        return problem
    print(ANNOUNCE, file=sys.stderr, flush=True)
    return _compile(src, name, with_cuda)


def _compile(src: Path, name: str, with_cuda: bool) -> bool | str:
    from torch.utils import cpp_extension

    sources = [str(f) for f in sorted(src.glob("*.cpp"))]
    sources += [str(f) for f in sorted(src.glob("*.cu"))] if with_cuda else []
    try:
        cpp_extension.load(name=name, sources=sources, extra_cflags=CXX_FLAGS,
                           extra_cuda_cflags=CUDA_FLAGS, extra_ldflags=LDFLAGS,
                           extra_include_paths=[str(src)], is_python_module=False,
                           with_cuda=with_cuda, verbose=False)
    except Exception as exc:  # compiler errors arrive as RuntimeError with the build log
        lines = [ln for ln in str(exc).splitlines() if "error" in ln.lower()] or [str(exc)]
        return f"build failed ({type(exc).__name__}): {lines[0][:300]}"
    return True
