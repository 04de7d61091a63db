"""What identifies the data files a spec names, for the run folder's records: a file replaced
under a run (same path, same shapes) must not pass for the data a stage was made with.

    data_stamps("npz:cifar10.npz") -> {"data.file:cifar10.npz": "sha256 3f9a..., 178 MB"}

Files are stamped by content (SHA-256) up to :data:`HASH_BYTES` in all (a CIFAR-10 npz hashes
in well under a second), larger ones by size and modification time. Image folders are stamped
by the modification times of their split and class folders (adding, removing or renaming an
image changes them; listing or hashing a million images would cost minutes). ``digits`` ships
with pccfast and has no stamp.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

HASH_BYTES = 512 << 20  # files hashed by content up to this many bytes in all
MAX_KEYS = 16  # more entries than this (class folders) are stamped as one digest
PREFIX = "data.file:"
ALL_KEY = "data.files"


def is_stamp(key: str) -> bool:
    return key.startswith(PREFIX) or key == ALL_KEY


def data_stamps(spec: str) -> dict[str, str]:
    """``{"data.file:NAME": stamp}`` for the files ``spec`` reads (empty for digits, or when
    they are missing: loading them says so)."""
    from . import parse_spec

    kind, path = parse_spec(spec)
    if path is None:
        return {}
    root = Path(path).expanduser()
    if kind == "cifar10":
        from .cifar10 import TEST_FILES, TRAIN_FILES, _folder

        folder = _folder(root)
        files = [folder / name for name in TRAIN_FILES + TEST_FILES]
        return _file_stamps([(f.relative_to(root).as_posix(), f) for f in files if f.is_file()])
    if kind == "imagefolder":
        return _folder_stamps(root)
    return _file_stamps([(root.name, root)] if root.is_file() else [])


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(timespec="seconds")


def _file_stamps(files: list[tuple[str, Path]]) -> dict[str, str]:
    sizes = {name: path.stat().st_size for name, path in files}
    hashed = sum(sizes.values()) <= HASH_BYTES
    out = {}
    for name, path in files:
        if hashed:
            out[PREFIX + name] = f"sha256 {_sha256(path)[:16]}, {sizes[name]} bytes"
        else:
            out[PREFIX + name] = f"{sizes[name]} bytes, modified {_when(path.stat().st_mtime)}"
    return out


def _folder_stamps(root: Path) -> dict[str, str]:
    """Split folders (train/, val/) and their class folders, by modification time."""
    if not root.is_dir():
        return {}
    entries = []
    for split in sorted(p for p in root.iterdir() if p.is_dir()):
        entries.append((split.name, split.stat().st_mtime_ns))
        entries += [(f"{split.name}/{c.name}", c.stat().st_mtime_ns)
                    for c in sorted(split.iterdir()) if c.is_dir()]
    if len(entries) <= MAX_KEYS:
        return {PREFIX + name + "/": f"folder modified {_when(ns / 1e9)}" for name, ns in entries}
    digest = hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
    newest = max(ns for _, ns in entries)
    return {ALL_KEY: f"{len(entries)} folders, newest modified {_when(newest / 1e9)}, "
                     f"digest {digest}"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
