"""Files pccfast writes get the permissions a plain open() would give them (umask; an existing
file keeps its mode), not the 0600 of the temporary file they are renamed from."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import pccfast
from faults import fill_disk
from pccfast.atomic import atomic_torch_save, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_new_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_torch_save({"x": torch.ones(2)}, tmp_path / "a.pt")
        atomic_write_text(tmp_path / "b.txt", "b")
        atomic_write_json(tmp_path / "sub" / "c.json", {"c": 1})
        pccfast.save(pccfast.models.vgg16_cifar(width=0.0625), tmp_path / "m.pt")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain") == expected  # what open() gives, for reference
    for name in ("a.pt", "b.txt", "sub/c.json", "m.pt"):
        assert _mode(tmp_path / name) == expected, name
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_rewritten_files_keep_their_mode(tmp_path):
    path = tmp_path / "s.json"
    atomic_write_json(path, {"v": 1})
    os.chmod(path, 0o640)
    atomic_write_json(path, {"v": 2})
    assert _mode(path) == 0o640 and path.read_text() == '{\n  "v": 2\n}\n'


@pytest.mark.parametrize("writes", [0, 1, 3])  # 1 and 3: torch's zip writer raises RuntimeError
def test_a_full_disk_is_named(tmp_path, monkeypatch, writes):
    """torch.save on a full disk: an OSError saying "no space left on device" and naming the
    file, the old file intact and no temporary file left."""
    path = tmp_path / "m.pt"
    atomic_torch_save({"old": torch.ones(3)}, path)
    fill_disk(monkeypatch, writes)
    with pytest.raises(OSError, match=f"no space left on device: cannot write {path}"):
        atomic_torch_save({"x": torch.randn(1000), "y": torch.randn(7)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["old"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
