"""Which backend runs an op: the one place that turns ``backend=`` into a choice.

``"torch"`` (the pure-PyTorch reference) always works. ``"cpu"`` needs the compiled extension,
``"cuda"`` the extension built with CUDA, ``"triton"`` an importable Triton and a CUDA tensor (or
``TRITON_INTERPRET=1`` for CPU tensors, as the tests use). ``"auto"`` picks the fastest one
available for the input's device. Asking for one that cannot run raises a ValueError that says
what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch

from .._checks import check_choice
from . import _C

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def _find_triton() -> str | None:
    """None when triton imports, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break pccfast
        return f"triton failed to import ({exc})"
    return None


# Decided once at import, so that dispatch is plain lookups that torch.compile traces freely.
_TRITON_MISSING = _find_triton()


def triton_failed(reason: str) -> None:
    """Marks the Triton backend unusable (pccfast's kernels failed to import), with why."""
    global _TRITON_MISSING
    _TRITON_MISSING = reason


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _interpreter_problem() -> str | None:
    """Triton's interpreter before 3.7 turns loop bounds into ints with ``int(array)``, which
    NumPy 2.4 refuses for the 1-element arrays it holds: every kernel would fail deep inside."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (
            f"TRITON_INTERPRET=1 with triton {triton.__version__} needs numpy<2.4 "
            f"(found numpy {numpy.__version__}); install numpy<2.4 or triton>=3.7"
        )
    return None


_INTERPRETER_PROBLEM = None if _TRITON_MISSING is not None else _interpreter_problem()


def interpreter_unavailable_reason() -> str | None:
    """Why TRITON_INTERPRET=1 cannot run here (None when it can). Decided once at import: the
    first dispatch of a process may be traced by torch.compile, which cannot trace the version
    parsing (torch 2.11's dynamo fails inside ``re``)."""
    return _INTERPRETER_PROBLEM


def triton_unavailable_reason(device: torch.device | None) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: whether triton imports at all)."""
    if _TRITON_MISSING is not None or device is None:
        return _TRITON_MISSING
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return interpreter_unavailable_reason()
    return f"triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), got {device}"


def cpu_unavailable_reason(device: torch.device) -> str | None:
    reason = _C.unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cpu":
        return f'backend "cpu" needs a CPU tensor, got {device}'
    return None


def cuda_unavailable_reason(device: torch.device) -> str | None:
    reason = _C.unavailable_reason()
    if reason is not None:
        return reason
    if not _C.has_cuda_kernels():
        return "pccfast._C was built without CUDA kernels (PCCFAST_CUDA=1 builds them)"
    if device.type != "cuda":
        return f'backend "cuda" needs a CUDA tensor, got {device}'
    arch = str(_C.build_info().get("cuda_arch", ""))
    capability = _capability(device.index if device.index is not None else -1)
    if arch and not arch_runs_on(arch, capability):
        major, minor = capability
        return (f"pccfast._C's CUDA kernels were built for {arch!r}, which cannot run on this "
                f"sm_{major}{minor} GPU (rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(None if index < 0 else index)


def arch_runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST build ("8.0;9.0+PTX", "9.0a") has code for a GPU: machine
    code of the same major and an older or equal minor, or PTX of an older or equal arch."""
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", entry)
        if match is None:
            continue
        built = (int(match[1]), int(match[2]))
        if built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if match[3] and built <= capability:
            return True
    return False


_REASONS = {
    "torch": lambda device: None,
    "cpu": cpu_unavailable_reason,
    "triton": triton_unavailable_reason,
    "cuda": cuda_unavailable_reason,
}

# Preference order of "auto" per op and device type; the first available one wins.
_AUTO = {
    ("pcc", "cuda"): ("triton", "torch"),
    ("pcc", "cpu"): ("cpu", "torch"),
    ("ci", "cuda"): ("cuda", "torch"),
    ("ci", "cpu"): ("cpu", "torch"),
}

# Backends that exist per op (PCC's GPU kernels are Triton, CI's are CUDA C++).
_IMPLEMENTED = {
    "pcc": ("torch", "cpu", "triton"),
    "ci": ("torch", "cpu", "cuda"),
}


# Input dtypes a backend cannot take, which "auto" routes elsewhere (the Triton kernels
# accumulate in fp32, so fp64 stays on the float64 backends).
_DTYPES_REFUSED = {("pcc", "triton"): (torch.float64,)}


def resolve(op: str, backend, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for ``op`` ("pcc" or "ci") on ``device`` for inputs of ``dtype``;
    raises if it cannot run."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        for name in _AUTO.get((op, device.type), ("torch",)):
            if _REASONS[name](device) is None and dtype not in _DTYPES_REFUSED.get((op, name), ()):
                return name
        return "torch"
    if backend not in _IMPLEMENTED[op]:
        gpu = "triton" if op == "pcc" else "cuda"
        raise ValueError(
            f'backend "{backend}" is not implemented for {op}; its choices are '
            f'{("auto",) + _IMPLEMENTED[op]} (its GPU kernels are the "{gpu}" backend)'
        )
    reason = _REASONS[backend](device)
    if reason is not None:
        raise ValueError(f'backend "{backend}" is unavailable for {op}: {reason}')
    return backend


def availability(device: torch.device | None = None) -> dict[str, str | None]:
    """backend name -> None when it can run, else the reason (for ``pccfast info``)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"torch": None, "cpu": cpu_unavailable_reason(torch.device("cpu"))}
    out["triton"] = triton_unavailable_reason(device)
    out["cuda"] = cuda_unavailable_reason(device)
    return out
