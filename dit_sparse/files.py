"""Atomic file writes: an output is written to a temporary file in its own folder and renamed over the target when
complete, so an interrupted run never leaves a partial file and never damages one that already exists."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

#: outputs are ordinary files, readable by all (mkstemp's temporary files are owner-only)
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".part") -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends, removed if it raises.

    `suffix` ends the temporary name (e.g. ".part.mp4" for writers that pick a format from the extension). The
    folder is created if needed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> str:
    """Write `data` (text as UTF-8) to `path` atomically and durably (fsync before the rename); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
    return os.fspath(path)
