"""reid.atomic_files: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid.atomic_files import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.bin"
    with atomic_write(target) as out:
        out.write(b"new")
        assert not target.exists()  # nothing at the name until the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(target, "w") as out:
        out.write("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.txt"]


def test_atomic_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial export")
        raise ValueError("export failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"export")
    assert target.read_bytes() == b"export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
