"""Loads the compiled extension ``pccfast._C`` once and remembers why it is missing.

Importing the extension registers the ``torch.ops.pccfast.*`` operators (TORCH_LIBRARY) and
their CPU and, when built with CUDA, CUDA kernels. Nothing here raises: callers ask
:func:`extension` for the module or :func:`unavailable_reason` for a sentence to show the user.
"""

from __future__ import annotations

import functools
import os

import torch


def _load():
    """-> (module or None, reason or None, build info dict)."""
    if os.environ.get("PCCFAST_DISABLE_EXT", "") == "1":
        return None, "disabled by PCCFAST_DISABLE_EXT=1", {}
    try:
        from .. import _C as module  # noqa: F401  (registers the operators)
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            return None, (
                "the compiled extension pccfast._C is not built "
                "(pip install --no-build-isolation -e . builds it)"
            ), {}
        return None, f"pccfast._C failed to load ({text}); rebuild it for this torch", {}
    except OSError as exc:
        return None, f"pccfast._C failed to load ({exc}); rebuild it for this torch", {}
    info = dict(module.build_info())
    built_for = info.get("torch_version", "?")
    running = torch.__version__.split("+")[0]
    if built_for != running:
        return None, (
            f"pccfast._C was built for torch {built_for} but torch {running} is running; "
            "rebuild it (pip install --no-build-isolation -e .)"
        ), info
    return module, None, info


# Loaded once at import: the accessors below are plain lookups, which torch.compile traces freely.
_MODULE, _REASON, _BUILD_INFO = _load()


def extension():
    """The loaded extension module, or None."""
    return _MODULE


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _REASON


def build_info() -> dict:
    """The extension's build record (torch and CUDA versions, CUDA arch), or {} when absent."""
    return dict(_BUILD_INFO) if _MODULE is not None else {}


def has_cuda_kernels() -> bool:
    return _MODULE is not None and bool(_BUILD_INFO.get("with_cuda", False))


def registration(fn):
    """Decorates the function that gives compiled ops their Python side (fake implementations,
    autograd) and runs it at once, when the extension is loaded: at the import of the module
    that defines it, never later (registering inside a ``torch.compile`` trace would break the
    graph). The returned ``register()`` says whether the ops are usable."""
    done = False
    if _MODULE is not None:
        fn()
        done = True

    @functools.wraps(fn)
    def register() -> bool:
        return done

    return register
