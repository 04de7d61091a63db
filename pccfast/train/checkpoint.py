"""Atomic training checkpoints that let ``--resume`` continue exactly.

A checkpoint holds the model and optimiser state, the gradient scaler, the epoch count, the
metrics history and every RNG state (torch CPU and CUDA, NumPy, Python). Batches are a pure
function of (seed, epoch) and the learning rate of the step, so nothing else is needed.

Everything in it is tensors, numbers, strings, lists, tuples and dicts, so it is read with
``torch.load(weights_only=True)``: a planted pickle in a run folder cannot run code on resume
(NumPy's RNG state is stored as a tensor, not as a pickled ndarray). ``origin`` records what
the checkpoint was made from (the pipeline's settings fingerprint), so a resume can refuse a
checkpoint left by a run with other settings.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_torch_save

FORMAT = "pccfast-train-checkpoint"
VERSION = 2


def rng_state() -> dict:
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": (int(version), tuple(int(x) for x in internal), gauss_next),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, *, stage: str, epoch: int, model, optimizer, scaler, history: list,
                    config: dict, origin: dict | None = None) -> None:
    """origin: what the run was made from, e.g. {"fingerprint": ..., "settings": {...}}."""
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "stage": stage,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "history": history,
        "config": config,
        "origin": origin,
    }, path)


def load_checkpoint(path, *, stage: str | None = None, fingerprint: str | None = None) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (weights_only: no code runs);
    clear errors for foreign files, other stages and, with ``fingerprint``, other settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"checkpoint {path} is truncated or unreadable, or holds objects "
                         f"other than tensors and numbers ({type(exc).__name__}: {first})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pccfast training checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')}; this "
                         f"pccfast resumes version {VERSION} only (start the stage afresh)")
    if stage is not None and ckpt["stage"] != stage:
        raise ValueError(f"checkpoint {path} belongs to stage {ckpt['stage']!r}, not {stage!r}")
    if fingerprint is not None:
        recorded = (ckpt.get("origin") or {}).get("fingerprint")
        if recorded != fingerprint:
            raise ValueError(f"checkpoint {path} was written by a run with other settings "
                             f"(fingerprint {recorded}, these settings give {fingerprint})")
    return ckpt
