"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``, so a
crash leaves the old file or the new one, never half of one. Every file pccfast writes (models,
checkpoints, CI scores, plans, run summaries) goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, IO

import torch


def atomic_write(path, write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(f)`` on a binary temporary file, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> None:
    """Indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))
