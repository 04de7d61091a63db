"""Prints the -D flags that let CMake find this environment's torch (and, for CUDA builds of
torch, the CUDA pieces its CMake config insists on, such as the pip-installed nvrtc)."""

import glob
import os
import sys

import torch

CUDA_HOME = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda")
                                            else None)
args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}"]
if torch.version.cuda and CUDA_HOME:
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}", f"-DCUDAToolkit_ROOT={CUDA_HOME}"]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    nvrtc += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
try:
    import pybind11

    args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
except ImportError:  # the Python module target is then skipped; the C++ tests still build
    pass
print(" ".join(args))
