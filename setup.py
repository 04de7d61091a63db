"""Builds the optional compiled extension ``pccfast._C``.

The C++ CPU kernels in csrc/ are always built. The CUDA kernels in kernels/ are added when a
CUDA toolkit and a CUDA build of torch are both present; ``PCCFAST_CUDA=1`` forces them (and
fails loudly when that is impossible), ``PCCFAST_CUDA=0`` skips them. ``PCCFAST_NO_EXT=1``
builds no extension at all: the package then runs on the pure-PyTorch reference backend.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_arch(torch) -> str:
    """The visible GPUs' architectures, else Hopper; with PTX of the newest, so that newer GPUs
    can still JIT-compile the kernels."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(count)})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    return "9.0+PTX"


def _want_cuda(torch, cuda_home):
    flag = os.environ.get("PCCFAST_CUDA", "").strip()
    have = torch.version.cuda is not None and cuda_home is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            sys.exit(
                "PCCFAST_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
            )
        return True
    return have


def _point_cuda_home_at_toolkit():
    """torch takes CUDA_HOME to be nvcc's grandparent folder; when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc) that folder holds no
    toolkit and linking fails (-lcudart). Use /usr/local/cuda then, unless CUDA_HOME is set."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    fallback = "/usr/local/cuda"
    if os.path.exists(os.path.join(fallback, "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = fallback


def _extensions():
    if os.environ.get("PCCFAST_NO_EXT", "") == "1":
        return [], {}
    _point_cuda_home_at_toolkit()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob("kernels/*.cu"))
    with_cuda = bool(cuda_sources) and _want_cuda(torch, CUDA_HOME)
    sources = sorted(glob.glob("csrc/*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    macros = [("PCCFAST_TORCH_VERSION", f'"{torch_version}"')]
    # The C++ standard comes from torch.utils.cpp_extension (C++20 for new torch). -fopenmp:
    # at::parallel_for / parallel_reduce are header templates that run serially unless the
    # extension itself is compiled with OpenMP; linked as libgomp.so.1, the soname of the
    # runtime torch has already loaded, so the process keeps one OpenMP runtime.
    cxx = ["-O3", "-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch(torch))
        sources += cuda_sources
        macros += [
            ("PCCFAST_WITH_CUDA", None),
            ("PCCFAST_CUDA_VERSION", f'"{torch.version.cuda}"'),
            ("PCCFAST_CUDA_ARCH", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'),
        ]
        nvcc = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "pccfast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "pccfast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
