"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``, so a
crash leaves the old file or the new one, never half of one. Every file pccfast writes (models,
checkpoints, CI scores, plans, run summaries) goes through here. Permissions are those a plain
``open()`` gives: an existing file keeps its mode, a new one gets 0666 less the umask (the
temporary file alone would make every file 0600)."""

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
        _chmod(fd, tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask (read from /proc on Linux: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod(fd: int, name: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows
        os.chmod(name, mode)


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
