"""saefast.files: an atomic write that fails (a crash at the rename) keeps the old file and leaves no temporary file
behind; the next write replaces it. (The checkpoints and stores written with it: tests/models/test_checkpoint.py,
tests/data/test_store.py.)"""

from __future__ import annotations

import os

import pytest

from saefast.files import atomic_write_bytes


def test_crash_inside_atomic_write_keeps_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
