"""Loads the compiled extension ``pccfast._C`` once and remembers why it is missing.

Importing the extension registers the ``torch.ops.pccfast.*`` operators (TORCH_LIBRARY) and
their CPU and, when built with CUDA, CUDA kernels. Nothing here raises: callers ask
:func:`extension` for the module or :func:`unavailable_reason` for a sentence to show the user.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _load():
    """-> (module or None, reason or None)."""
    if os.environ.get("PCCFAST_DISABLE_EXT", "") == "1":
        return None, "disabled by PCCFAST_DISABLE_EXT=1"
    try:
        from .. import _C as module  # noqa: F401  (registers the operators)
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            return None, (
                "the compiled extension pccfast._C is not built "
                "(pip install --no-build-isolation -e . builds it)"
            )
        return None, f"pccfast._C failed to load ({text}); rebuild it for this torch"
    except OSError as exc:
        return None, f"pccfast._C failed to load ({exc}); rebuild it for this torch"
    info = module.build_info()
    built_for = info.get("torch_version", "?")
    running = torch.__version__.split("+")[0]
    if built_for != running:
        return None, (
            f"pccfast._C was built for torch {built_for} but torch {running} is running; "
            "rebuild it (pip install --no-build-isolation -e .)"
        )
    return module, None


def extension():
    """The loaded extension module, or None."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _load()[1]


def build_info() -> dict:
    """The extension's build record (torch and CUDA versions, CUDA arch), or {} when absent."""
    module = extension()
    return dict(module.build_info()) if module is not None else {}


def has_cuda_kernels() -> bool:
    return bool(build_info().get("with_cuda", False))
