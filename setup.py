"""Builds fastvae's C++ (and, when available, CUDA) extension `fastvae._C`.

Build mode, from the environment:
  FASTVAE_CUDA=auto (default)  CUDA sources when torch is a CUDA build and nvcc is found
  FASTVAE_CUDA=1               CUDA sources, or fail if that is impossible
  FASTVAE_CUDA=0               CPU only
  TORCH_CUDA_ARCH_LIST         GPU architectures (default here: 8.0;9.0, which covers A100 and H100/H200)
Install with `pip install --no-build-isolation .` so the extension is built
against the torch already installed (an isolated build would fetch another torch
and produce a mismatched ABI).
"""

import glob
import os
import shutil
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_mode():
    """Decide whether to compile the CUDA sources, and say why."""
    wanted = os.environ.get("FASTVAE_CUDA", "auto").strip().lower()
    if wanted not in ("auto", "0", "1"):
        sys.exit(f"setup.py: FASTVAE_CUDA must be auto, 0 or 1, got {wanted!r}")
    torch_has_cuda = torch.version.cuda is not None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    have_nvcc = nvcc is not None and os.path.exists(nvcc)
    if wanted == "0":
        return False, "CPU only (FASTVAE_CUDA=0)"
    if torch_has_cuda and have_nvcc:
        return True, f"CPU + CUDA (torch {torch.__version__} built for CUDA {torch.version.cuda}, nvcc {nvcc})"
    reason = "torch is a CPU-only build" if not torch_has_cuda else "nvcc not found (set CUDA_HOME)"
    if wanted == "1":
        sys.exit(f"setup.py: FASTVAE_CUDA=1 but {reason}")
    return False, f"CPU only ({reason})"


def extension():
    with_cuda, why = cuda_mode()
    print(f"fastvae setup.py: building {why}", flush=True)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to BuildExtension, which picks what the installed torch needs
    # (C++20 for torch 2.14). -fopenmp: at::parallel_for runs its loop body through OpenMP pragmas in
    # the header, so they must be compiled here; the libgomp loaded is torch's.
    # -fno-math-errno/-fno-trapping-math change no result, but let GCC
    # vectorize sqrt and the branch-free selects of csrc/fastvae.h.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("fastvae._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"fastvae setup.py: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "fastvae._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
