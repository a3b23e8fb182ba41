"""qovaryx_data.fileio.atomic_write: complete under its name, or not there at all."""
from __future__ import annotations

import pytest

from qovaryx_data.fileio import atomic_write


def test_text_bytes_and_writer_functions(tmp_path):
    atomic_write(tmp_path / "a.txt", "line\r\nnext\n")
    assert (tmp_path / "a.txt").read_bytes() == b"line\r\nnext\n"
    atomic_write(tmp_path / "b.bin", b"\x00\xff", fsync=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    atomic_write(tmp_path / "c.txt", lambda tmp: tmp.write_text("by path"))
    assert (tmp_path / "c.txt").read_text() == "by path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "dataset.json"
    target.write_text("old, complete")

    def half_then_crash(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
