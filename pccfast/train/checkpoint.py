"""Atomic training checkpoints that let ``--resume`` continue exactly.

A checkpoint holds the model and optimiser state, the gradient scaler, the epoch count, the
metrics history and every RNG state (torch CPU and CUDA, NumPy, Python). Batches are a pure
function of (seed, epoch) and the learning rate of the step, so nothing else is needed.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_torch_save

FORMAT = "pccfast-train-checkpoint"
VERSION = 1


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, *, stage: str, epoch: int, model, optimizer, scaler, history: list,
                    config: dict) -> None:
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
    }, path)


def load_checkpoint(path, *, stage: str | None = None) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint`; clear errors for foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is truncated or unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pccfast training checkpoint")
    if stage is not None and ckpt["stage"] != stage:
        raise ValueError(f"checkpoint {path} belongs to stage {ckpt['stage']!r}, not {stage!r}")
    return ckpt
