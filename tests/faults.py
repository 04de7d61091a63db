"""Faults the tests inject: a disk that fills up."""

from __future__ import annotations

import errno
import os


class FullDisk:
    """A file whose writes fail with ENOSPC after ``writes`` successful ones."""

    def __init__(self, f, writes: int = 0):
        self._f, self._writes = f, writes

    def write(self, data):
        self._writes -= 1
        if self._writes < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def fill_disk(monkeypatch, writes: int = 0) -> None:
    """Every file opened through ``os.fdopen`` (how pccfast's atomic writers open theirs) from
    now on fills the disk after ``writes`` writes; ``monkeypatch.undo()`` empties it again."""
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), writes))
