"""Atomic writes: a completed write replaces the file whole; a failed one leaves the old file and no temporary."""

import os

import pytest
from dit_sparse.files import atomic_path, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "out.json"
    assert write_atomic(target, "first") == str(target)
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["out.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "video.mp4"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="encoder died"):
        with atomic_path(target, suffix=".part.mp4") as tmp:
            assert tmp.endswith(".part.mp4") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as file:
                file.write(b"half a vid")
            raise RuntimeError("encoder died")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["video.mp4"]
