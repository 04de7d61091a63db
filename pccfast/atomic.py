"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``, so a
crash leaves the old file or the new one, never half of one. Every file pccfast writes (models,
checkpoints, CI scores, plans, run summaries) goes through here. Permissions are those a plain
``open()`` gives: an existing file keeps its mode, a new one gets 0666 less the umask (the
temporary file alone would make every file 0600)."""

from __future__ import annotations

import errno
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise no_space(exc, path) or exc
    recording = None
    try:
        _chmod(fd, tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = no_space(exc, path, recording.error if recording is not None else None)
        if full is not None:
            raise full from exc
        raise


def no_space(exc: BaseException, path, seen: OSError | None = None) -> OSError | None:
    """An OSError saying "no space left on device" and naming ``path`` when ``exc`` is a full
    disk (an ENOSPC anywhere in its chain, or ``seen``: torch's zip writer turns the ENOSPC of
    a write into a RuntimeError about stream positions), else None."""
    chain, link = [seen] if seen is not None else [], exc
    while link is not None and len(chain) < 16:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return OSError(errno.ENOSPC, f"no space left on device: cannot write {path} (free some "
                                     "space, or choose a folder on another disk)")
    return None


class _Recording:
    """A binary file that remembers the OSError its write raised (see :func:`no_space`)."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


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
