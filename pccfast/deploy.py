"""Deploying a pruned model: ``pccfast.export(model, path, input_size, format=...)``.

A pruned model is a plain ``nn.Module`` with narrower layers, so the standard exporters take it:

- ``"onnx"``: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; needs
  ``onnxscript``), runnable in onnxruntime (``pip install 'pccfast[deploy]'``);
- ``"torchscript"``: ``torch.jit.trace``, loadable with ``torch.jit.load`` (C++ too; PyTorch
  deprecates TorchScript in favour of torch.export, but many deployments still read it);
- ``"exported"``: a ``torch.export`` program saved with ``torch.export.save``
  (``torch.export.load(path).module()`` runs it; AOTInductor compiles it).

Every format has a dynamic batch dimension (traced at batch 2, so that torch.export does not
specialise it to 1). Files are written atomically. A model an exporter cannot handle raises
:class:`ExportError` naming the op (or the exporter's first line), never a half-written file.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write_bytes
from ._modules import unwrap_parallel

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}
TRACE_BATCH = 2  # batch 1 would be specialised (torch.export treats 0 and 1 as constants)
MAX_BATCH = 1 << 16
_OP = re.compile(r"\b((?:aten|prims|torch\.ops\.\w+|[a-z_]\w*)(?:::|\.)[A-Za-z_]\w*"
                 r"(?:\.(?:default|Tensor|Scalar|int|\w+))?)")


_OVERLOAD = re.compile(r"OpOverload\(op='([^']+)', overload='([^']+)'\)")
_REASON = re.compile(r"No ONNX function found|Could not guard|Unsupported|not supported|"
                     r"might cause the trace to be incorrect")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(RuntimeError):
    """A model could not be exported; the message names the op or construct at fault."""


def export(model: nn.Module, path, input_size, *, format: str = "onnx",
           opset: int | None = None) -> Path:
    """Writes ``model`` (eval mode, CPU, fp32) to ``path`` in ``format``; returns the path.

    input_size: one input's shape ``(C, H, W)`` or ``(N, C, H, W)`` (N is ignored: the batch
      dimension is dynamic in every format).
    format: ``"onnx"``, ``"torchscript"`` or ``"exported"`` (see the module docstring).
    opset: the ONNX opset (default: the exporter's).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    model = unwrap_parallel(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"opset must be an ONNX opset number such as 18, got {opset!r}")
    from .speed import _image_size

    size = _image_size(input_size)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give a file name such as "
                         f"{path / ('model' + SUFFIXES[format])}")
    training = model.training
    model.eval()
    try:
        x = torch.randn(TRACE_BATCH, *size, generator=torch.Generator().manual_seed(0))
        x = x.to(_device_of(model))
        data = {"onnx": _onnx_bytes, "torchscript": _torchscript_bytes,
                "exported": _exported_bytes}[format](model, x, opset)
    finally:
        model.train(training)
    atomic_write_bytes(path, data)
    return path


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def _exported_program(model: nn.Module, x: torch.Tensor, what: str):
    try:
        return torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},), strict=False)
    except Exception as exc:
        raise _error(model, what, exc) from exc


def _exported_bytes(model, x, opset) -> bytes:
    program = _exported_program(model, x, "torch.export")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _onnx_bytes(model, x, opset) -> bytes:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency: say so plainly)
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'pccfast[deploy]' "
                          "(or pip install onnx onnxscript onnxruntime)") from exc
    program = _exported_program(model, x, "ONNX (torch.export step)")
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress and deprecation notes
            onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False,
                                             report=False, **kwargs)
    except Exception as exc:
        raise _error(model, "ONNX", exc) from exc
    return onnx_program.model_proto.SerializeToString()


def _torchscript_bytes(model, x, opset) -> bytes:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notes
            # a trace that may not hold for other inputs (a tensor read as a Python value,
            # e.g. data-dependent control flow) is an error, not a file that computes wrongly
            warnings.simplefilter("error", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, (x,), check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
    except Exception as exc:
        raise _error(model, "TorchScript", exc) from exc
    return buffer.getvalue()


def _error(model: nn.Module, what: str, exc: Exception) -> ExportError:
    """An ExportError naming the op the exporter stopped at (when its messages name one)."""
    texts, seen = [], exc
    while seen is not None and len(texts) < 8:  # the exception and its causes
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    ops = [".".join(m) for m in _OVERLOAD.findall(text)]
    ops += [m for m in _OP.findall(text) if "::" in m or m.startswith(("aten.", "prims."))]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if _REASON.search(line)), None) or \
        (lines[0] if lines else type(exc).__name__)
    where = f" at op {ops[0]}" if ops else ""
    kind = "TracerWarning" if "trace to be incorrect" in reason else type(exc).__name__
    return ExportError(f"cannot export {type(model).__name__} to {what}{where}: "
                       f"{kind}: {_ANSI.sub('', reason)[:300]}")


def load_onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for an exported file (``threads``: intra-op)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("running ONNX models needs onnxruntime: pip install "
                          "'pccfast[deploy]'") from exc
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
