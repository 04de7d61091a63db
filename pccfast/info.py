"""What this installation can run, and why not: the text of ``pccfast info``."""

from __future__ import annotations

import platform

import torch

from . import _openmp
from .ops import _C, backends


def collect() -> dict:
    """Versions, the extension's build record and each backend's availability."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # absent or broken: backends.availability says which
        triton_version = None
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": cuda_device,
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": _openmp.describe(),
        "extension": _C.build_info() or None,
        "extension_missing": _C.unavailable_reason(),
        "backends": backends.availability(),
    }


def format_info(info: dict | None = None) -> str:
    info = collect() if info is None else info
    lines = [
        f"python      {info['python']}",
        f"torch       {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"triton      {info['triton'] or 'not installed'}",
        f"GPU         {info['cuda_device'] or 'none visible'}",
        f"CPU threads {info['cpu_threads']}, OpenMP wait policy {info['omp_wait_policy']}",
    ]
    ext = info["extension"]
    if ext:
        cuda = (f"CUDA {ext.get('cuda_version')} arch {ext.get('cuda_arch')}"
                if ext.get("with_cuda") else "no CUDA kernels")
        lines.append(f"pccfast._C  built for torch {ext.get('torch_version')}, {cuda}")
    else:
        lines.append(f"pccfast._C  unavailable: {info['extension_missing']}")
    lines.append("backends:")
    for name, reason in info["backends"].items():
        lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
